"""Pictures of an evaluation, for people: a per-class bar plot and a best / worst sample grid.

- `per_class_plot`: the per-class value of a scored view (PQ per category, IoU per class, AP per
  category; `ScoreReport.per_class`), sorted, the weakest and strongest classes when there are many;
- `sample_grid`: for tasks scored per sample (referring, reasoning, interactive: IoU per item;
  panoptic: PQ per image), the best and the worst samples, each as "ground truth | prediction" over
  the image.

Both return None when the report has nothing to draw (e.g. no per-sample scores), so callers can log
whatever exists.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from xsam.data import masks as mask_codec
from xsam.model.visualize import overlay, panoptic_overlay, save_png, side_by_side

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
    """The `count` best and worst samples, each row "ground truth | prediction": referring-style items by
    IoU (`predictions` = their masks.json) or panoptic images by PQ (`predictions` = panoptic.json with its
    PNG folder). None when the report has no per-sample scores or the predictions are absent."""
    from xsam.data.shards import RecordReader

    predictions = Path(predictions)
    panoptic = report.task.endswith("-panoptic")
    if not report.per_sample or not predictions.is_file():
        return None
    ranked = sorted(report.per_sample.items(), key=lambda kv: (kv[1], kv[0]))
    best = ranked[::-1][:count]
    chosen = best + [kv for kv in ranked[:count][::-1] if kv not in best]
    metric = "PQ" if panoptic else "IoU"
    draw = _panoptic_row(gt, predictions) if panoptic else _referring_row(gt, predictions)
    shard_of = dict(zip((r.key for r in gt.records), gt.shards))
    reader = RecordReader(gt.dataset)
    rows = []
    try:
        for key, value in chosen:
            truth, pred, record = draw(key)
            image = reader.get(shard_of[record.key], record.key).image
            with Image.open(io.BytesIO(image)) as im:
                pixels = np.asarray(im.convert("RGB"))
            panel = side_by_side([truth(pixels), pred(pixels)],
                                 [f"{key}: ground truth", f"prediction, {metric} {100 * value:.1f}"])
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
    unit = "images" if panoptic else "samples"
    shown = (f"all {len(ranked)} {unit} by {metric}, best first" if len(ranked) <= 2 * count
             else f"best {count} and worst {count} of {len(ranked)} {unit} by {metric}")
    return save_png(side_by_side([grid], [f"{title}: {shown}"]), path)


def _referring_row(gt: Any, predictions: Path) -> Callable[[str], tuple[Callable, Callable, Any]]:
    preds = {e.get("key"): e.get("segmentation") for e in json.loads(predictions.read_text())}
    samples = {s.key: s for s in gt.referring_samples()}

    def draw(key: str) -> tuple[Callable, Callable, Any]:
        sample = samples[key]
        truth = sample.gt_mask()
        rle = preds.get(key)
        pred = mask_codec.decode(mask_codec.from_coco(rle)) if rle else np.zeros_like(truth)
        label = _prompt(sample)
        return (lambda px: overlay(px, [truth], [label]), lambda px: overlay(px, [pred], [label]), sample.record)

    return draw


def _panoptic_row(gt: Any, predictions: Path) -> Callable[[str], tuple[Callable, Callable, Any]]:
    from xsam.eval.groundtruth import image_key
    from xsam.eval.panoptic import rgb_to_id

    names = {c["id"]: c["name"] for c in gt.categories}
    annotations = {image_key(a["image_id"]): a for a in json.loads(predictions.read_text())["annotations"]}
    images = gt.images

    def draw(key: str) -> tuple[Callable, Callable, Any]:
        record = images[key]
        ids, segments = gt.panoptic(record)
        truth = [(i, names.get(c, str(c))) for i, c, crowd in segments if not crowd]
        found = annotations.get(key)
        pred_ids = np.zeros_like(ids)
        listed: list[tuple[int, str]] = []
        if found is not None:
            with Image.open(predictions.with_suffix("") / found["file_name"]) as im:
                pred_ids = rgb_to_id(np.asarray(im.convert("RGB")))
            listed = [(s["id"], names.get(s["category_id"], str(s["category_id"]))) for s in found["segments_info"]]
        return (lambda px: panoptic_overlay(px, ids, truth), lambda px: panoptic_overlay(px, pred_ids, listed), record)

    return draw


def _prompt(sample: Any) -> str:
    span = sample.item.spans[0] if sample.item.spans else None
    if span is not None and span.phrase_index is not None:
        text = sample.record.phrases[span.phrase_index]
        return text if len(text) <= 40 else text[:37] + "..."
    if span is not None and span.prompt_index is not None:
        return f"{sample.record.visual_prompts[span.prompt_index].kind} prompt"
    return ""
