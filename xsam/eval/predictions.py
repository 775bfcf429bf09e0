"""Prediction files, in the formats the reference evaluators read, parsed with errors that say where.

- **COCO results** (instance, semantic, vgdseg): a JSON list of
  `{"image_id", "category_id", "segmentation": RLE, "score"}` (pycocotools `loadRes`). `image_id` is the
  upstream image id (`xsam.eval.groundtruth.image_key`). For semantic scoring each entry is one class's
  region of an image (the COCO-Stuff results layout); where entries overlap, the higher score wins.
- **COCO panoptic results** (panoptic): `PRED.json` = `{"annotations": [{"image_id", "file_name",
  "segments_info": [{"id", "category_id"}]}]}` with the PNGs in the folder `PRED/` beside it
  (panopticapi's convention; ids as RGB, id = R + 256 G + 256² B, 0 = void).
- **Masks** (refseg, grefseg, reaseg, intseg): a JSON list of `{"key", "segmentation": RLE | null}`,
  `key` being the evaluation item key `RECORDKEY#i` (what `xsam eval` writes), or, for the
  RefCOCO family, `{"image_id", "sent_id", "segmentation"}` with the upstream sentence id. A null
  segmentation is an empty mask (for gRefCOCO: "no target").
- **GCG** (gcgseg): a JSON list of `{"image_id", "caption", "phrases": [...], "segmentations": [RLE, ...]}`
  (one mask per phrase, in order; `"key": RECORDKEY` may replace `image_id`), GLaMM's per-image output
  with the masks as RLE.

An RLE is `{"size": [h, w], "counts": str}` (compressed, as pycocotools writes it) or uncompressed
`counts` (a list). Every reader refuses duplicates: two predictions for one sample would make the
score depend on the order of the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from xsam.data import masks as mask_codec
from xsam.eval.groundtruth import image_key

MAX_PREDICTION_BYTES = 4 << 30


class PredictionError(ValueError):
    """A prediction file that cannot be scored; the message names the file and the entry."""


def load_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise PredictionError(f"prediction file {path} does not exist")
    if path.stat().st_size > MAX_PREDICTION_BYTES:
        raise PredictionError(f"{path} is {path.stat().st_size} bytes, over the {MAX_PREDICTION_BYTES} bytes accepted")
    try:
        with path.open("rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise PredictionError(f"{path} is not valid JSON: {exc}") from None


def _list(data: Any, path: Path, what: str) -> list[Any]:
    if not isinstance(data, list):
        raise PredictionError(f"{path}: expected a JSON list of {what}, got {type(data).__name__}")
    return data


def _entry(entry: Any, path: Path, i: int, required: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise PredictionError(f"{path}: entry {i} is a {type(entry).__name__}, expected an object")
    missing = [k for k in required if k not in entry]
    if missing:
        raise PredictionError(f"{path}: entry {i} lacks {', '.join(missing)} (it has {', '.join(sorted(entry)) or 'nothing'})")
    return entry


def decode_rle(rle: Any, where: str) -> np.ndarray:
    """A prediction's RLE as a bool mask; errors name `where`."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise PredictionError(f"{where}: segmentation must be an RLE object {{size: [h, w], counts}}")
    try:
        size = [int(v) for v in rle["size"]]
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"size {rle['size']!r}")
        return mask_codec.decode(mask_codec.from_coco({"size": size, "counts": rle["counts"]}))
    except (ValueError, TypeError, KeyError) as exc:
        raise PredictionError(f"{where}: cannot decode the RLE segmentation ({exc})") from None


@dataclass(kw_only=True, slots=True)
class CocoResult:
    image: str  # normalised image id
    category_id: int
    segmentation: dict[str, Any]  # as given (validated decodable lazily)
    score: float
    index: int


def coco_results(path: str | Path) -> list[CocoResult]:
    path = Path(path)
    out = []
    for i, raw in enumerate(_list(load_json(path), path, "COCO results")):
        e = _entry(raw, path, i, ("image_id", "category_id", "segmentation"))
        try:
            category, score = int(e["category_id"]), float(e.get("score", 1.0))
        except (TypeError, ValueError):
            raise PredictionError(f"{path}: entry {i}: category_id must be an integer and score a number") from None
        seg = e["segmentation"]
        if not isinstance(seg, dict) or "size" not in seg or "counts" not in seg:
            raise PredictionError(f"{path}: entry {i}: segmentation must be an RLE object {{size, counts}}"
                                  " (polygons are not accepted for masks: encode them with pycocotools)")
        out.append(CocoResult(image=image_key(e["image_id"]), category_id=category, segmentation=seg,
                              score=score, index=i))
    return out


@dataclass(kw_only=True, slots=True)
class PanopticPrediction:
    image: str
    png: Path
    segments: list[tuple[int, int]]  # (id, category_id)

    def ids(self) -> np.ndarray:
        if not self.png.is_file():
            raise PredictionError(f"panoptic PNG {self.png} (image {self.image}) does not exist")
        from xsam.eval.panoptic import rgb_to_id

        with Image.open(self.png) as im:
            rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
        return rgb_to_id(rgb)


def panoptic_results(path: str | Path) -> dict[str, PanopticPrediction]:
    path = Path(path)
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise PredictionError(f"{path}: expected the COCO panoptic results format {{\"annotations\": [...]}}")
    folder = path.with_suffix("")
    if not folder.is_dir():
        raise PredictionError(f"{path}: its PNG folder {folder}/ does not exist (panopticapi's layout:"
                              " PRED.json with the PNGs in PRED/)")
    out: dict[str, PanopticPrediction] = {}
    for i, raw in enumerate(data["annotations"]):
        e = _entry(raw, path, i, ("image_id", "file_name", "segments_info"))
        key = image_key(e["image_id"])
        if key in out:
            raise PredictionError(f"{path}: image {e['image_id']} has two annotations (entries {i} and an earlier one)")
        name = str(e["file_name"])
        if Path(name).name != name or name in ("", ".", ".."):
            raise PredictionError(f"{path}: entry {i}: file_name {name!r} must be a plain file name inside {folder}/")
        segments = []
        for j, s in enumerate(_list(e["segments_info"], path, "segments")):
            s = _entry(s, path, i, ("id", "category_id"))
            try:
                segments.append((int(s["id"]), int(s["category_id"])))
            except (TypeError, ValueError):
                raise PredictionError(f"{path}: entry {i} segment {j}: id and category_id must be integers") from None
        out[key] = PanopticPrediction(image=key, png=folder / name, segments=segments)
    return out


def mask_results(path: str | Path) -> dict[str, dict[str, Any] | None]:
    """Sample name -> RLE (None: empty). Names are item keys, or `IMAGE/SENT_ID` for image_id + sent_id."""
    path = Path(path)
    out: dict[str, dict[str, Any] | None] = {}
    for i, raw in enumerate(_list(load_json(path), path, "mask predictions")):
        e = _entry(raw, path, i, ("segmentation",))
        if "key" in e:
            name = str(e["key"])
        elif "image_id" in e and "sent_id" in e:
            name = f"{image_key(e['image_id'])}/{e['sent_id']}"
        else:
            raise PredictionError(f"{path}: entry {i} needs a \"key\" (RECORDKEY#i) or \"image_id\" + \"sent_id\"")
        if name in out:
            raise PredictionError(f"{path}: two predictions for {name} (entry {i} repeats it)")
        seg = e["segmentation"]
        if seg is not None and not isinstance(seg, dict):
            raise PredictionError(f"{path}: entry {i} ({name}): segmentation must be an RLE object or null")
        out[name] = seg
    return out


@dataclass(kw_only=True, slots=True)
class GcgPrediction:
    caption: str
    phrases: list[str]
    segmentations: list[dict[str, Any]]
    scores: list[float] | None


def gcg_results(path: str | Path) -> dict[str, GcgPrediction]:
    """Image id (or record key) -> the generated caption, its phrases and one mask per phrase."""
    path = Path(path)
    out: dict[str, GcgPrediction] = {}
    for i, raw in enumerate(_list(load_json(path), path, "GCG predictions")):
        e = _entry(raw, path, i, ("caption", "phrases", "segmentations"))
        if "image_id" in e:
            name = image_key(e["image_id"])
        elif "key" in e:
            name = str(e["key"])
        else:
            raise PredictionError(f"{path}: entry {i} needs an \"image_id\" (or the record \"key\")")
        if name in out:
            raise PredictionError(f"{path}: two predictions for image {name} (entry {i} repeats it)")
        phrases, segs = e["phrases"], e["segmentations"]
        if not (isinstance(phrases, list) and isinstance(segs, list) and len(phrases) == len(segs)):
            raise PredictionError(f"{path}: entry {i} ({name}): phrases and segmentations must be lists of"
                                  f" equal length (one mask per phrase)")
        scores = e.get("scores")
        if scores is not None and (not isinstance(scores, list) or len(scores) != len(segs)):
            raise PredictionError(f"{path}: entry {i} ({name}): scores must be one number per phrase")
        out[name] = GcgPrediction(caption=str(e["caption"]), phrases=[str(p) for p in phrases],
                                  segmentations=segs, scores=[float(s) for s in scores] if scores else None)
    return out
