"""Build larger or broken upstream inputs FROM the real samples in the corpora folder.

Every builder copies real upstream bytes (the COCO val2017 image 439180, its panoptic PNG, the real
polygons of image 39769) under new ids, so tests exercise the converters at more than one record
without inventing annotation content.
"""

from __future__ import annotations

import copy
import io
import json
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dataprep.convert import ConvertParams

PAN_ID = 439180


def load_json(path: Path) -> Any:
    return json.loads(path.read_text())


def build_panoptic(corpora: Path, out: Path, n: int) -> dict[str, Path]:
    """A COCO panoptic layout with `n` copies of the real sample under image ids 1..n."""
    src = corpora / "coco_panoptic"
    doc = load_json(src / "annotations" / "panoptic_val2017.json")
    image0, ann0 = doc["images"][0], doc["annotations"][0]
    images_dir = out / "val2017"
    masks_dir = out / "annotations" / "panoptic_val2017"
    images_dir.mkdir(parents=True, exist_ok=True)
    masks_dir.mkdir(parents=True, exist_ok=True)
    jpg = (src / "val2017" / f"{PAN_ID:012d}.jpg").read_bytes()
    png = (src / "annotations" / "panoptic_val2017" / f"{PAN_ID:012d}.png").read_bytes()
    doc["images"], doc["annotations"] = [], []
    for i in range(1, n + 1):
        name = f"{i:012d}"
        (images_dir / f"{name}.jpg").write_bytes(jpg)
        (masks_dir / f"{name}.png").write_bytes(png)
        doc["images"].append({**image0, "id": i, "file_name": f"{name}.jpg"})
        doc["annotations"].append({**copy.deepcopy(ann0), "image_id": i, "file_name": f"{name}.png"})
    annotations = out / "annotations" / "panoptic_val2017.json"
    annotations.write_text(json.dumps(doc))
    return {"images": images_dir, "annotations": annotations, "masks": masks_dir}


INSTANCE_SAMPLES = {
    # the real polygon sample: image 39769 (PNG), 6 polygon annotations
    "polygons": ("coco_instances_polygons", "instances_val2017.json"),
    # the real RLE sample: the JPEG 439180 with 32 RLE annotations (2 crowd)
    "rle": ("coco_instances", "panoptic_coco_detection_format.json"),
}


def build_instances(
    corpora: Path, out: Path, n: int, sample: str = "polygons", split: str = "val2017"
) -> dict[str, Path]:
    """A COCO instances layout with `n` copies of a real sample (see INSTANCE_SAMPLES) as `split`."""
    folder, annotation_file = INSTANCE_SAMPLES[sample]
    src = corpora / folder
    doc = load_json(src / "annotations" / annotation_file)
    image0 = doc["images"][0]
    anns0 = doc["annotations"]
    images_dir = out / split
    images_dir.mkdir(parents=True, exist_ok=True)
    image_bytes = (src / "val2017" / image0["file_name"]).read_bytes()
    ext = Path(image0["file_name"]).suffix
    doc["images"], doc["annotations"] = [], []
    next_ann = 1
    for i in range(1, n + 1):
        name = f"{i:012d}{ext}"
        (images_dir / name).write_bytes(image_bytes)
        doc["images"].append({**image0, "id": i, "file_name": name})
        for ann in anns0:
            doc["annotations"].append({**copy.deepcopy(ann), "image_id": i, "id": next_ann})
            next_ann += 1
    annotations = out / "annotations" / f"instances_{split}.json"
    annotations.parent.mkdir(parents=True, exist_ok=True)
    annotations.write_text(json.dumps(doc))
    return {"images": images_dir, "annotations": annotations}


def panoptic_sample_record(corpora: Path):
    """The real COCO panoptic val2017 image 439180 as a genseg Record built independently of the
    converter (numpy + masks.encode), with its panoptic id map and the upstream JSON document."""
    import hashlib

    import numpy as np
    from PIL import Image as PILImage

    from xsam.data import masks
    from xsam.data.schema import Image, Record, Segment, Source, make_key

    src = corpora / "coco_panoptic"
    ann_path = src / "annotations" / "panoptic_val2017.json"
    doc = json.loads(ann_path.read_bytes())
    (info,), (ann,) = doc["images"], doc["annotations"]
    cats = {c["id"]: c for c in doc["categories"]}
    png = PILImage.open(src / "annotations" / "panoptic_val2017" / ann["file_name"]).convert("RGB")
    rgb = np.asarray(png, dtype=np.uint32)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]  # panoptic id = R + 256 G + 256^2 B
    segments = [
        Segment(
            id=s["id"],
            rle=masks.encode(ids == s["id"]),
            category_id=s["category_id"],
            category_name=cats[s["category_id"]]["name"],
            isthing=bool(cats[s["category_id"]]["isthing"]),
            iscrowd=bool(s["iscrowd"]),
            bbox=tuple(float(v) for v in s["bbox"]),
            area=float(s["area"]),
        )
        for s in ann["segments_info"]
    ]
    jpg = (src / "val2017" / info["file_name"]).read_bytes()
    record = Record(
        key=make_key("coco-panoptic", "val2017", info["id"]),
        task="genseg",
        source=Source(
            corpus="coco-panoptic",
            split="val2017",
            upstream_ids={"image_id": info["id"]},
            annotation_file=ann_path.name,
            annotation_sha256=hashlib.sha256(ann_path.read_bytes()).hexdigest(),
        ),
        image=Image(
            ext="jpg",
            sha256=hashlib.sha256(jpg).hexdigest(),
            bytes=len(jpg),
            width=info["width"],
            height=info["height"],
            file_name=info["file_name"],
        ),
        segments=segments,
        ignore=masks.encode(ids == 0),  # void pixels
    )
    return record, ids, doc


def dataset_files(root: Path) -> dict[str, bytes]:
    """Every file of a dataset folder except the run logs, for byte-identity comparisons."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.relative_to(root).as_posix().startswith("logs/")
    }


def convert_once(tmp_path_factory, name: str, corpus: str, inputs: dict, params: ConvertParams) -> Path:
    """Convert into a folder shared by the whole test session (a re-run is a no-op)."""
    from rich.console import Console

    from jobs.convert import run_conversion

    out = tmp_path_factory.getbasetemp() / "converted" / name
    if not (out / "manifest.parquet").exists():
        run_conversion(corpus, str(out), inputs, params, num_workers=1, console=Console(quiet=True))
    return out


def convert_local(corpus: str, out: Path, inputs: dict, params: ConvertParams | None = None) -> Path:
    """Convert in this process, without Ray (prepare, every unit, finalize): for tests that need
    a dataset folder, not the conversion job."""
    from dataprep.convert import ConvertParams, finalize, prepare, run_unit
    from dataprep.converters import get_converter
    from xsam.data.storage import open_storage

    params = params or ConvertParams()
    storage = open_storage(out)
    converter = get_converter(corpus)(**{k: str(v) for k, v in inputs.items()})
    prepared = prepare(converter, storage, params)
    if not prepared.complete:
        results = [
            run_unit(converter, unit, storage, params, prepared.digest, prepared.plan.categories)
            for unit in prepared.units
        ]
        finalize(prepared, storage, results)
    return Path(out)


def panoptic_inputs(root: Path, annotations: Path | None = None) -> dict[str, str]:
    """The real COCO panoptic sample's inputs (optionally with another annotation file)."""
    return {
        "images": str(root / "val2017"),
        "annotations": str(annotations or root / "annotations" / "panoptic_val2017.json"),
        "masks": str(root / "annotations" / "panoptic_val2017"),
    }


def read_samples(root: Path) -> dict:
    """Every sample of a local dataset folder: {key: (ShardSample, {ext: member bytes})}."""
    from dataprep.shard_writer import iter_shard
    from xsam.data.schema import ShardSample

    out = {}
    for shard in sorted((Path(root) / "shards").glob("*.tar")):
        with open(shard, "rb") as f:
            for key, members in iter_shard(f):
                out[key] = (ShardSample.model_validate_json(members["json"]), members)
    return out


def read_records(root: Path) -> dict:
    """{key: ShardSample} of a local dataset folder."""
    return {key: sample for key, (sample, _) in read_samples(root).items()}


def tiny_record(task: str, n_segments: int, split: str = "train", *, key: str | None = None, **fields: Any):
    """A hand-built 4x6 record with `n_segments` disjoint single-column segments (renderer and text
    tests; the key defaults to `tiny-SPLIT-N`)."""
    import numpy as np

    from xsam.data import masks
    from xsam.data.schema import Image, Record, Segment, Source, make_key

    h, w = 4, 6
    segments = []
    for i in range(n_segments):
        mask = np.zeros((h, w), bool)
        mask[:, i] = True
        segments.append(Segment(id=100 + i, rle=masks.encode(mask), bbox=(float(i), 0.0, 1.0, 4.0), area=4.0))
    return Record(
        key=key or make_key("tiny", split, n_segments),
        task=task,
        source=Source(corpus="tiny", split=split, upstream_ids={"image_id": 1}, annotation_file="a.json",
                      annotation_sha256="0" * 64),
        image=Image(ext="jpg", sha256="0" * 64, bytes=1, width=w, height=h, file_name="a.jpg"),
        segments=segments,
        **fields,
    )


# One example dataset per task, for model tests: {name: dataset folder}.
TASK_EXAMPLES = {
    "refcoco": "refseg",
    "reasonseg": "reaseg",
    "coco-vgd": "vgdseg",
    "coco-interactive": "intseg",
    "gcg-grandf": "gcgseg",
    "llava": "chat",
}


def build_task_world(corpora: Path, root: Path) -> dict[str, Path]:
    """Convert the example corpora (one per task, plus COCO instances for genseg) and build the tiny
    tokenizer; {name: folder}, with "tokenizer" the tokenizer folder."""
    from dataprep.convert import ConvertParams
    from dataprep.examples import make_examples
    from xsam.text import build_tiny_tokenizer

    out = {"tokenizer": build_tiny_tokenizer(root / "tokenizer")}
    found = make_examples(corpora, root / "examples")
    for name in TASK_EXAMPLES:
        inputs = dict(found[name])
        if name == "coco-vgd":
            inputs["split"] = "train2017"
        out[name] = convert_local(_corpus(name), root / name, inputs, ConvertParams())
    inst = build_instances(corpora, root / "in-inst", 4, sample="rle", split="train2017")
    out["coco-instances"] = convert_local("coco-instances", root / "coco-instances", inst, ConvertParams())
    return out


# The tiny stage-3 training runs of the tests: four of the task world's datasets as the recipe's
# mixture (`--set data.mixture.sources=...`, relative to `data.root` = the world's folder).
TASK_WORLD_SOURCES = ("[{name: llava, path: llava, repeat: sqrt}, {name: refcoco, path: refcoco, repeat: sqrt}, "
                      "{name: reasonseg, path: reasonseg, repeat: sqrt}, {name: coco-vgd, path: coco-vgd, repeat: sqrt}]")
# Two runs that must train alike (resumed, restarted, on other workers) match within this, relative and
# per step; the measured differences are documented in docs/training.md.
LOSS_TOLERANCE = 1e-5


def max_relative_loss_difference(a: list[dict], b: list[dict]) -> float:
    """The largest relative difference between two loss curves (steps.jsonl records), step by step."""
    worst = max(abs(x["loss"] - y["loss"]) / abs(x["loss"]) for x, y in zip(a, b))
    print(f"max relative loss difference over {len(a)} steps: {worst:.2e}")  # shown with pytest -s
    return worst


def _corpus(name: str) -> str:
    from dataprep.examples import corpus_of

    return corpus_of(name)


def task_batches(world: dict[str, Path], name: str, *, preprocess, batch_size: int = 2, seed: int = 0,
                 splits: list[str] | None = None, render=None, max_length: int = 2048) -> list:
    """Dense `Batch`es of one example dataset, through the real loader (source-grouped, one pass)."""
    from xsam.data.builder import XSamBuilder
    from xsam.data.loader import StreamLoader
    from xsam.data.mixture import parse_mixture

    source = {"name": name, "path": str(world[name]), "repetitions": 1}
    if splits:
        source["splits"] = splits
    spec = parse_mixture({"seed": seed, "batching": {"mode": "source_grouped", "global_batch_size": batch_size,
                                                     "remainder": "pad"}, "sources": [source]})
    kw = {} if render is None else {"render": render}
    builder = XSamBuilder(tokenizer=world["tokenizer"], preprocess=preprocess, seed=seed, micro_batch_size=batch_size,
                          max_length=max_length, **kw)
    loader = StreamLoader(spec, builder=builder, cache_dir=world["tokenizer"].parent / "cache")
    return [p.to("cpu") for p in loader]


# The evaluation splits of the example corpora, for scoring and evaluation tests: {name: dataset folder}.
EVAL_EXAMPLES = ("refcoco", "grefcoco", "coco-interactive", "coco-vgd", "gcg-eval")


def build_eval_world(corpora: Path, root: Path) -> dict[str, Path]:
    """Convert the example corpora whose evaluation splits X-SAM's benchmarks read (RefCOCO val/testA/
    testB, gRefCOCO val, COCO-Interactive val, COCO-VGD val2017, GranD-f GCG val), the real COCO
    panoptic sample (val2017) and the real COCO polygons (val2017), in this process."""
    from dataprep.convert import ConvertParams
    from dataprep.examples import make_examples

    found = make_examples(corpora, root / "examples")
    out = {name: convert_local(_corpus(name), root / name, dict(found[name]), ConvertParams()) for name in EVAL_EXAMPLES}
    out["coco-panoptic"] = convert_local("coco-panoptic", root / "coco-panoptic",
                                         panoptic_inputs(corpora / "coco_panoptic"), ConvertParams())
    polygons = corpora / "coco_instances_polygons"
    out["coco-instances"] = convert_local("coco-instances", root / "coco-instances", {
        "images": str(polygons / "val2017"), "annotations": str(polygons / "annotations" / "instances_val2017.json"),
    }, ConvertParams())
    return out


def tar_add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    """A regular member NAME holding DATA (any name, `../` and absolute ones included: hostile archives)."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def tar_link(tf: tarfile.TarFile, name: str, target: str, kind: bytes) -> None:
    """A link member NAME -> TARGET (`kind`: tarfile.SYMTYPE or tarfile.LNKTYPE)."""
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    tf.addfile(info)
