"""`xsam data overlap`: shared images per pair and evaluation images leaked into training.

Datasets are converted from the real COCO samples (tests/builders.py) and from derived copies:

- `val`: the real COCO panoptic sample (val2017, image 439180, the real JPEG);
- `train_copy`: the same real JPEG and panoptic PNG under ids 1 and 2, split `train2017`
  (same bytes, other ids: found by sha256 only);
- `train_png`: the real COCO instances sample of image 439180 (its 32 real annotations) with the
  real JPEG re-encoded losslessly as PNG, split `train2017` (other bytes, same COCO id 439180:
  found by COCO id only);
- `inst_val`: the real COCO instances sample as is (same JPEG and id as `val`: shares both).
"""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest
from builders import build_panoptic, panoptic_inputs
from PIL import Image as PILImage
from rich.console import Console
from typer.testing import CliRunner

from dataprep.convert import ConvertParams
from xsam.data.manifest import INDEX, read_parquet
from dataprep.overlap import COCO_CORPORA, coco_image_id, overlap_report
from xsam.data.storage import open_storage
from jobs.convert import run_conversion
from pipelines.cli import app

runner = CliRunner()


def convert(corpus: str, out: Path, inputs: dict) -> Path:
    run_conversion(corpus, str(out), {k: str(v) for k, v in inputs.items()}, ConvertParams(), num_workers=1,
                   console=Console(quiet=True))
    return out


def instances_png_copy(corpora: Path, out: Path) -> dict[str, Path]:
    """The real COCO instances sample of image 439180 with its JPEG re-encoded as a PNG (same pixels)."""
    src = corpora / "coco_instances"
    doc = json.loads((src / "annotations" / "panoptic_coco_detection_format.json").read_text())
    (image,) = doc["images"]
    image["file_name"] = image["file_name"].replace(".jpg", ".png")
    images = out / "train2017"
    images.mkdir(parents=True)
    PILImage.open(src / "val2017" / "000000439180.jpg").save(images / image["file_name"], format="PNG")
    annotations = out / "annotations" / "instances_train2017.json"
    annotations.parent.mkdir(parents=True)
    annotations.write_text(json.dumps(doc))
    return {"images": images, "annotations": annotations, "split": "train2017"}


@pytest.fixture(scope="module")
def datasets(ray_session, corpora, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("overlap")
    copy = build_panoptic(corpora, base / "in-copy", 2)
    inst = corpora / "coco_instances"
    return {
        "val": convert("coco-panoptic", base / "val", panoptic_inputs(corpora / "coco_panoptic")),
        "train_copy": convert("coco-panoptic", base / "train-copy", {**copy, "split": "train2017"}),
        "train_png": convert("coco-instances", base / "train-png", instances_png_copy(corpora, base / "in-png")),
        "inst_val": convert(
            "coco-instances", base / "inst-val",
            {"images": inst / "val2017", "annotations": inst / "annotations" / "panoptic_coco_detection_format.json"},
        ),
    }


def cli(*args: str, code: int = 0) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, f"xsam {' '.join(args)} -> {result.exit_code}\n{result.output}\n{result.exception!r}"
    return result.output


def test_leak_by_sha256_and_by_coco_id(datasets, tmp_path):
    d = datasets
    png = tmp_path / "leak.png"
    report = json.loads(cli("data", "overlap", str(d["val"]), str(d["train_copy"]), str(d["train_png"]),
                            str(d["inst_val"]), "--json", "--png", str(png)))
    labels = [x["label"] for x in report["datasets"]]
    assert labels == ["coco-panoptic:val", "coco-panoptic:train-copy", "coco-instances:train-png", "coco-instances:inst-val"]
    assert report["datasets"][1]["splits"] == {"train2017": {"records": 2, "images": 1, "training": True}}
    leaks = {(r["eval"], r["eval_split"], r["train"]): r for r in report["leaks"]}
    # 2 eval splits (val, inst_val) x 2 training datasets (train_copy, train_png)
    assert len(leaks) == 4 and report["leaked_total"] == 4
    by_sha = leaks[("coco-panoptic:val", "val2017", "coco-panoptic:train-copy")]
    assert (by_sha["eval_images"], by_sha["leaked"], by_sha["sha256"], by_sha["percent"]) == (1, 1, 1, 100.0)
    assert by_sha["coco_id"] == 0  # ids 1, 2 vs 439180: the bytes found it
    by_id = leaks[("coco-panoptic:val", "val2017", "coco-instances:train-png")]
    assert (by_id["leaked"], by_id["sha256"], by_id["coco_id"]) == (1, 0, 1)  # other bytes, same COCO id
    pairs = {(p["a"], p["b"]): p for p in report["pairs"]}
    both = pairs[("coco-panoptic:val", "coco-instances:inst-val")]
    assert (both["sha256"], both["coco_id"]) == (1, 1)
    assert both["by_split"] == [{"split_a": "val2017", "split_b": "val2017", "sha256": 1, "coco_id": 1, "either": 1}]
    other = pairs[("coco-panoptic:train-copy", "coco-instances:train-png")]
    assert (other["sha256"], other["coco_id"]) == (0, 0)
    # the chart: one bar per leak row, readable size, written where asked
    assert report["png"] == str(png)
    with PILImage.open(png) as img:
        assert img.format == "PNG" and img.width >= 800 and img.height >= 80 + 4 * 40


def test_human_table_and_single_dataset(datasets):
    out = cli("data", "overlap", str(datasets["val"]), str(datasets["train_copy"]))
    assert "(leaks)" in out and "100.0" in out and "train-copy" in out
    # one dataset: no pair; its own eval split has no training split to leak into
    report = json.loads(cli("data", "overlap", str(datasets["val"]), "--json"))
    assert report["pairs"] == [] and report["leaks"] == []


def test_unreadable_input_exits_2(datasets, tmp_path):
    cli("data", "overlap", str(datasets["val"]), str(tmp_path / "missing"), code=2)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("dataset.json", "manifest.parquet"):
        (broken / name).write_bytes((datasets["val"] / name).read_bytes())
    (broken / INDEX).write_bytes(b"not parquet")
    cli("data", "overlap", str(datasets["val"]), str(broken), "--json", code=2)


def test_s3_dataset(datasets, bucket):
    client = boto3.client("s3")
    root = datasets["train_copy"]
    for path in sorted(root.rglob("*")):
        if path.is_file():
            client.put_object(Bucket=bucket, Key=f"ds/{path.relative_to(root).as_posix()}", Body=path.read_bytes())
    url = f"s3://{bucket}/ds"
    report = overlap_report([open_storage(datasets["val"]), open_storage(url)])
    assert report["datasets"][1]["path"] == url
    assert [r["leaked"] for r in report["leaks"]] == [1]


def test_coco_id_rule(datasets):
    rows = read_parquet(open_storage(datasets["val"]), INDEX)
    assert json.loads(rows[0]["upstream_ids"]) == {"image_id": 439180}
    assert coco_image_id({"image_id": 439180}, coco_corpus=True) == 439180
    assert coco_image_id({"image_id": 439180}, coco_corpus=False) is None  # e.g. ADE20K: never compared
    assert coco_image_id({"image_id": "ADE_val_00000001"}, coco_corpus=True) is None
    assert coco_image_id({"ref_id": 5, "coco_image_id": 9}, coco_corpus=False) == 9  # explicit convention
    assert {"coco-panoptic", "coco-instances", "refcoco", "refcoco+", "refcocog", "grefcoco"} <= COCO_CORPORA
