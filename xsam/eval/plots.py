"""Pictures of an evaluation, for people: a per-class bar plot and a best / worst sample grid.

- `per_class_plot`: the per-class value of a scored view (PQ per category, IoU per class, AP per
  category; `ScoreReport.per_class`), sorted, the weakest and strongest classes when there are many;
- `sample_grid`: for tasks scored per sample (referring, reasoning, interactive: IoU per item), the
  best and the worst items, each as "ground truth | prediction" over the image with the item's prompt.

Both return None when the report has nothing to draw (e.g. no per-sample scores), so callers can log
whatever exists.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from xsam.data import masks as mask_codec
from xsam.model.visualize import overlay, save_png, side_by_side

MAX_CLASSES = 40  # bars drawn: the 20 weakest and the 20 strongest classes beyond this many


def per_class_plot(report: Any, path: str | Path, *, title: str) -> Path | None:
    """A horizontal bar per class (its PQ / IoU / AP), lowest first; None without per-class values."""
    values = {k: v for k, v in report.per_class.items() if v == v}  # NaN-free
    if not values:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = sorted(values.items(), key=lambda kv: (kv[1], kv[0]))
    if len(ordered) > MAX_CLASSES:
        half = MAX_CLASSES // 2
        ordered = ordered[:half] + [("…", float("nan"))] + ordered[-half:]
    metric = {"panoptic": "PQ", "semantic": "IoU", "instance": "AP"}.get(report.task.rsplit("-", 1)[-1], "AP")
    fig, ax = plt.subplots(figsize=(7, 0.25 * len(ordered) + 1.2), dpi=100)
    names = [k for k, _ in ordered]
    ax.barh(range(len(ordered)), [0 if v != v else v for _, v in ordered], color="tab:blue")
    for y, (_, v) in enumerate(ordered):
        if v == v:
            ax.text(min(v, 88) + 1, y, f"{v:.1f}", va="center", fontsize=7)
    ax.set_yticks(range(len(ordered)), names, fontsize=8)
    ax.set_xlim(0, 100)
    ax.set_xlabel(f"{metric} per class (%)")
    ax.set_title(f"{title}: {report.task}, {len(values)} classes")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def sample_grid(report: Any, gt: Any, predictions: str | Path, path: str | Path, *, title: str,
                count: int = 3, max_side: int = 768) -> Path | None:
    """The `count` best and worst items by IoU, each row "ground truth | prediction"; None when the
    report has no per-sample scores or the predictions file is absent."""
    from xsam.data.shards import RecordReader

    predictions = Path(predictions)
    if not report.per_sample or not predictions.is_file():
        return None
    ranked = sorted(report.per_sample.items(), key=lambda kv: (kv[1], kv[0]))
    best = ranked[::-1][:count]
    chosen = best + [kv for kv in ranked[:count][::-1] if kv not in best]
    preds = {e.get("key"): e.get("segmentation") for e in json.loads(predictions.read_text())}
    samples = {s.key: s for s in gt.referring_samples()}
    shard_of = dict(zip((r.key for r in gt.records), gt.shards))
    reader = RecordReader(gt.dataset)
    rows = []
    try:
        for key, iou in chosen:
            sample = samples[key]
            image = reader.get(shard_of[sample.record.key], sample.record.key).image
            with Image.open(io.BytesIO(image)) as im:
                pixels = np.asarray(im.convert("RGB"))
            truth = sample.gt_mask()
            rle = preds.get(key)
            pred = mask_codec.decode(mask_codec.from_coco(rle)) if rle else np.zeros_like(truth)
            label = _prompt(sample)
            panel = side_by_side([overlay(pixels, [truth], [label]), overlay(pixels, [pred], [f"IoU {100 * iou:.1f}"])],
                                 [f"{key}: ground truth", "prediction"])
            scale = max_side / max(panel.size)
            if scale < 1:
                panel = panel.resize((int(panel.width * scale), int(panel.height * scale)))
            rows.append(panel)
    finally:
        reader.close()
    width = max(r.width for r in rows)
    grid = Image.new("RGB", (width, sum(r.height for r in rows)), (255, 255, 255))
    top = 0
    for r in rows:
        grid.paste(r, (0, top))
        top += r.height
    shown = (f"all {len(ranked)} samples by IoU, best first" if len(ranked) <= 2 * count
             else f"best {count} and worst {count} of {len(ranked)} samples by IoU")
    return save_png(side_by_side([grid], [f"{title}: {shown}"]), path)


def _prompt(sample: Any) -> str:
    span = sample.item.spans[0] if sample.item.spans else None
    if span is not None and span.phrase_index is not None:
        text = sample.record.phrases[span.phrase_index]
        return text if len(text) <= 40 else text[:37] + "..."
    if span is not None and span.prompt_index is not None:
        return f"{sample.record.visual_prompts[span.prompt_index].kind} prompt"
    return ""
