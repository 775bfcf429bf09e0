"""`xsam data overlap`: images shared between datasets, and evaluation images leaked into training.

Reads only the metadata files (`dataset.json`, `index.parquet`), so it is cheap locally and on S3.

Two images are "the same image" when

1. their bytes are equal: same `index.parquet` `image_sha256` (any two datasets), or
2. they carry the same upstream COCO image id, and BOTH datasets hold COCO images (bytes may differ:
   a re-encoded copy, another release's file). The COCO id rule:

   - a record whose `upstream_ids` has a `coco_image_id` entry (an int) carries that COCO id in
     any corpus: the explicit convention for a converter whose own ids are not COCO's (e.g. a
     GCG/RefCOCOg flavor keyed by its own ids that still knows the COCO image id);
   - otherwise a record's `upstream_ids["image_id"]` (an int) is a COCO image id only when its
     dataset's `dataset.json` `corpus` is in `COCO_CORPORA`: corpora whose images ARE COCO images
     and whose `image_id` is COCO's (train2014/val2014/train2017/val2017 share one id space: the
     2017 splits re-partition the 2014 images under the same ids). ADE20K's `image_id` (a file
     stem) or any other corpus's ids are never compared.

Splits: a split whose name starts with "train" is training, every other split is evaluation.
The leak table has one row per (evaluation dataset, evaluation split, training dataset): how many
distinct images (by sha256) of that evaluation split appear in any training split of the training
dataset (by bytes or COCO id). A dataset is also compared with its own training splits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xsam.data.manifest import DATASET, INDEX, load_dataset, read_parquet
from xsam.data.storage import Storage

# Corpora whose `upstream_ids["image_id"]` is a COCO image id (their images are COCO images).
COCO_CORPORA = frozenset(
    {
        "coco-panoptic",
        "coco-instances",
        "coco-stuff",
        "coco-interactive",
        "coco-semantic",
        "refcoco",
        "refcoco+",
        "refcocog",
        "grefcoco",
    }
)
COCO_ID_KEY = "coco_image_id"  # explicit convention, honoured in any corpus


class OverlapInputError(ValueError):
    """A dataset folder that cannot be read as a complete dataset."""


def is_training(split: str) -> bool:
    return split.startswith("train")


@dataclass(slots=True)
class DatasetImages:
    """One dataset's images per split: sha256 set and sha256 -> COCO id."""

    path: str
    corpus: str
    task: str
    version: str
    coco_corpus: bool
    label: str = ""
    records: dict[str, int] = field(default_factory=dict)  # split -> records
    shas: dict[str, set[str]] = field(default_factory=dict)  # split -> distinct image sha256
    coco_ids: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> {sha256: coco id}

    def train_splits(self) -> list[str]:
        return [s for s in sorted(self.shas) if is_training(s)]

    def eval_splits(self) -> list[str]:
        return [s for s in sorted(self.shas) if not is_training(s)]

    def all_shas(self, splits: list[str] | None = None) -> set[str]:
        out: set[str] = set()
        for s in self.shas if splits is None else splits:
            out |= self.shas[s]
        return out

    def all_ids(self, splits: list[str] | None = None) -> set[int]:
        out: set[int] = set()
        for s in self.coco_ids if splits is None else splits:
            out |= set(self.coco_ids[s].values())
        return out


def coco_image_id(upstream_ids: dict[str, Any], coco_corpus: bool) -> int | None:
    """The COCO image id a record carries under the rule in the module docstring, else None."""
    value = upstream_ids.get(COCO_ID_KEY)
    if value is None and coco_corpus:
        value = upstream_ids.get("image_id")
    if isinstance(value, bool) or not isinstance(value, int):
        return None
    return value


def load_images(storage: Storage) -> DatasetImages:
    """Read one dataset's `dataset.json` and `index.parquet` (OverlapInputError when unreadable)."""
    try:
        files = load_dataset(storage)
        rows = read_parquet(storage, INDEX)
    except FileNotFoundError as err:
        raise OverlapInputError(str(err)) from err
    except ValueError as err:  # JSON or parquet that does not parse (pyarrow errors are ValueErrors)
        raise OverlapInputError(f"{storage.describe(INDEX)} or {storage.describe(DATASET)}: {err}") from err
    corpus = str(files.meta.get("corpus", ""))
    data = DatasetImages(
        path=storage.url, corpus=corpus, task=str(files.meta.get("task", "")), version=files.version,
        coco_corpus=corpus in COCO_CORPORA,
    )
    for row in rows:
        try:
            split, sha = row["split"], row["image_sha256"]
            ids = json.loads(row["upstream_ids"] or "{}")
        except (KeyError, TypeError, ValueError) as err:
            raise OverlapInputError(f"{storage.describe(INDEX)}: not a dataset index ({err!r})") from err
        data.records[split] = data.records.get(split, 0) + 1
        data.shas.setdefault(split, set())
        data.coco_ids.setdefault(split, {})
        if not sha:  # a text-only record has no image
            continue
        data.shas[split].add(sha)
        cid = coco_image_id(ids if isinstance(ids, dict) else {}, data.coco_corpus)
        if cid is not None:
            data.coco_ids[split].setdefault(sha, cid)
    return data


def _labels(datasets: list[DatasetImages]) -> None:
    """Short unique labels: the corpus name; when two datasets share it, the folder name (prefixed
    with `corpus:` unless it already contains the corpus name)."""
    counts: dict[str, int] = {}
    for d in datasets:
        counts[d.corpus] = counts.get(d.corpus, 0) + 1
    seen: set[str] = set()
    for i, d in enumerate(datasets):
        folder = d.path.rstrip("/").rsplit("/", 1)[-1]
        label = d.corpus if counts[d.corpus] == 1 else folder if d.corpus in folder else f"{d.corpus}:{folder}"
        if label in seen:
            label = f"{label}#{i}"
        seen.add(label)
        d.label = label


def _matched(shas: set[str], ids: dict[str, int], other_shas: set[str], other_ids: set[int]) -> tuple[int, int, int]:
    """(by sha256, by COCO id, by either) distinct images of `shas` found in the other set."""
    by_sha = {s for s in shas if s in other_shas}
    by_id = {s for s in shas if s in ids and ids[s] in other_ids}
    return len(by_sha), len(by_id), len(by_sha | by_id)


def _pct(part: int, whole: int) -> float:
    return round(100.0 * part / whole, 2) if whole else 0.0


def overlap_report(storages: list[Storage]) -> dict[str, Any]:
    """The overlap report of the given datasets (see the module docstring); JSON-ready."""
    datasets = [load_images(s) for s in storages]
    _labels(datasets)
    pairs = []
    for i, a in enumerate(datasets):
        for b in datasets[i + 1 :]:
            ids_ok = bool(a.all_ids()) and bool(b.all_ids())
            shared_sha = a.all_shas() & b.all_shas()
            shared_ids = a.all_ids() & b.all_ids() if ids_ok else set()
            by_split = []
            for sa in sorted(a.shas):
                for sb in sorted(b.shas):
                    b_ids = set(b.coco_ids[sb].values()) if ids_ok else set()
                    n_sha, n_id, n_any = _matched(a.shas[sa], a.coco_ids[sa] if ids_ok else {}, b.shas[sb], b_ids)
                    by_split.append({"split_a": sa, "split_b": sb, "sha256": n_sha, "coco_id": n_id, "either": n_any})
            pairs.append(
                {
                    "a": a.label, "b": b.label,
                    "sha256": len(shared_sha),
                    "coco_id": len(shared_ids) if ids_ok else None,
                    "coco_ids_compared": ids_ok,
                    "by_split": by_split,
                }
            )
    leaks = []
    for e in datasets:
        for split in e.eval_splits():
            images = e.shas[split]
            for t in datasets:
                train = t.train_splits()
                if not train:
                    continue
                ids_ok = bool(e.coco_ids[split]) and bool(t.all_ids(train))
                n_sha, n_id, n_any = _matched(
                    images, e.coco_ids[split] if ids_ok else {}, t.all_shas(train), t.all_ids(train) if ids_ok else set()
                )
                leaks.append(
                    {
                        "eval": e.label, "eval_split": split, "train": t.label, "train_splits": train,
                        "eval_images": len(images), "sha256": n_sha, "coco_id": n_id if ids_ok else None,
                        "leaked": n_any, "percent": _pct(n_any, len(images)),
                    }
                )
    return {
        "datasets": [
            {
                "label": d.label, "path": d.path, "corpus": d.corpus, "task": d.task, "version": d.version,
                "coco_ids": d.coco_corpus or any(d.coco_ids[s] for s in d.coco_ids),
                "splits": {
                    s: {"records": d.records[s], "images": len(d.shas[s]), "training": is_training(s)}
                    for s in sorted(d.shas)
                },
            }
            for d in datasets
        ],
        "pairs": pairs,
        "leaks": leaks,
        "leaked_total": sum(1 for row in leaks if row["leaked"]),
        "rule": {
            "training_split": "name starts with 'train'",
            "coco_corpora": sorted(COCO_CORPORA),
            "coco_id_key": COCO_ID_KEY,
        },
    }


def write_leak_png(report: dict[str, Any], path: str | Path) -> Path:
    """A bar chart (PIL) of the leak table: one bar per (eval dataset/split, train dataset)."""
    from PIL import Image, ImageDraw, ImageFont

    rows = report["leaks"]
    title_font, font, small = (ImageFont.load_default(size=s) for s in (22, 16, 13))
    pad, bar_h, gap = 20, 26, 14
    labels = [f"{r['eval']} / {r['eval_split']}  in  {r['train']} ({', '.join(r['train_splits'])})" for r in rows]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max([probe.textlength(t, font=font) for t in labels] + [200])
    bar_w = 420
    value_w = 300
    width = int(pad * 3 + label_w + bar_w + value_w)
    header_h = 80
    height = header_h + max(1, len(rows)) * (bar_h + gap) + pad + 24
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.text((pad, pad), "Evaluation images found in training datasets", fill=(0, 0, 0), font=title_font)
    draw.text(
        (pad, pad + 30),
        "same image = same sha256, or same COCO image id when both datasets hold COCO images; "
        "bar = % of the eval split's distinct images",
        fill=(90, 90, 90), font=small,
    )
    x_bar = pad * 2 + label_w
    y = header_h
    if not rows:
        draw.text((pad, y), "no evaluation split or no training split among the datasets", fill=(0, 0, 0), font=font)
    for text, r in zip(labels, rows):
        draw.text((pad, y + 4), text, fill=(0, 0, 0), font=font)
        draw.rectangle([x_bar, y, x_bar + bar_w, y + bar_h], fill=(238, 238, 238), outline=(200, 200, 200))
        filled = int(round(bar_w * r["percent"] / 100.0))
        color = (205, 45, 45) if r["leaked"] else (120, 170, 120)
        if filled:
            draw.rectangle([x_bar, y, x_bar + filled, y + bar_h], fill=color)
        detail = f"{r['leaked']:,} / {r['eval_images']:,}  ({r['percent']:.1f}%)"
        parts = [f"sha {r['sha256']:,}"] + ([f"id {r['coco_id']:,}"] if r["coco_id"] is not None else [])
        draw.text((x_bar + bar_w + pad, y + 4), f"{detail}  [{', '.join(parts)}]", fill=(0, 0, 0), font=font)
        y += bar_h + gap
    draw.text((pad, height - pad - 10), "training split: name starts with 'train'", fill=(90, 90, 90), font=small)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out, format="PNG", optimize=True)
    return out
