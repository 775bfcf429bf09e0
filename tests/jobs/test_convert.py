"""The conversion job end to end: real CLI, real Ray, real samples; the promises it makes.

- every mask decodes to exactly the upstream mask, every image is byte-equal, every rendering is
  reproducible from (seed, key, epoch, item);
- the same inputs give a byte-identical folder for any number of workers and for folder vs
  archive inputs, locally and on S3;
- a resumed run reuses finished shards only when their hash verifies; a finished run is a no-op.

SIGKILL at seeded random points and a full disk are fault drills: tests/drills/test_drill_kill.py and
tests/drills/test_drill_disk_full.py.
"""

from __future__ import annotations

import json
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from builders import build_panoptic, dataset_files, read_samples
from PIL import Image as PILImage
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from dataprep.convert import ConvertParams, prepare, run_unit
from dataprep.converters import get_converter
from xsam.data.manifest import INDEX, MANIFEST, read_parquet, version_id
from xsam.data.storage import open_storage
from pipelines.cli import app
from xsam.data import masks
from xsam.data.render import Category, load_templates, render_record

runner = CliRunner()


def cli(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, f"xsam {' '.join(args)} -> {result.exit_code}\n{result.output}\n{result.exception!r}"
    return result.output


def convert_args(corpus: str, out: Path | str, inputs: dict[str, Path], *extra: str) -> list[str]:
    args = ["data", "convert", corpus, "--out", str(out)]
    for name, path in inputs.items():
        args += [f"--{name}", str(path)]
    return [*args, *extra]




def test_panoptic_round_trip(ray_session, corpora, tmp_path):
    src = corpora / "coco_panoptic"
    inputs = {
        "images": src / "val2017",
        "annotations": src / "annotations" / "panoptic_val2017.json",
        "masks": src / "annotations" / "panoptic_val2017",
    }
    cli(*convert_args("coco-panoptic", tmp_path / "out", inputs))
    samples = read_samples(tmp_path / "out")
    assert list(samples) == ["coco-panoptic-val2017-000000439180"]
    sample, members = samples["coco-panoptic-val2017-000000439180"]
    record = sample.record
    jpg = (src / "val2017" / "000000439180.jpg").read_bytes()
    assert members["jpg"] == jpg  # original bytes, never re-encoded
    rgb = np.asarray(PILImage.open(src / "annotations" / "panoptic_val2017" / "000000439180.png")).astype(np.int64)
    ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
    info = json.loads(inputs["annotations"].read_text())["annotations"][0]["segments_info"]
    assert [s.id for s in record.segments] == sorted(s["id"] for s in info)
    for seg in record.segments:
        assert np.array_equal(masks.decode(seg.rle), ids == seg.id), seg.id  # pixel-equal
    crowd = np.isin(ids, [s["id"] for s in info if s["iscrowd"]])
    assert np.array_equal(masks.decode(record.ignore), (ids == 0) | crowd)
    # the stored rendering is the default one and is reproducible from (seed, key, epoch, item)
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    vocab = [Category(id=c["id"], name=c["name"], isthing=c["isthing"]) for c in meta["categories"]]
    again = render_record(record, seed=0, epoch=0, templates=load_templates(), vocabulary=vocab)
    assert [i.model_dump() for i in again] == [i.model_dump() for i in sample.items]
    assert sample.items[0].key == f"{record.key}#0"


def test_instances_round_trip_polygons(ray_session, corpora, tmp_path):
    src = corpora / "coco_instances_polygons"
    ann_path = src / "annotations" / "instances_val2017.json"
    cli(*convert_args("coco-instances", tmp_path / "out", {"images": src / "val2017", "annotations": ann_path}))
    (sample, members), = read_samples(tmp_path / "out").values()
    assert members["png"] == (src / "val2017" / "000000039769.png").read_bytes()
    doc = json.loads(ann_path.read_text())
    h, w = doc["images"][0]["height"], doc["images"][0]["width"]
    by_id = {a["id"]: a for a in doc["annotations"]}
    assert sorted(by_id) == [s.id for s in sample.record.segments]
    for seg in sample.record.segments:
        upstream = by_id[seg.id]
        reference = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(upstream["segmentation"], h, w)))
        assert np.array_equal(masks.decode(seg.rle), reference.astype(bool))  # pycocotools annToMask
        assert seg.area == upstream["area"] and list(seg.bbox) == upstream["bbox"]


def test_instances_rle_and_crowd(ray_session, corpora, tmp_path):
    src = corpora / "coco_instances"
    ann_path = src / "annotations" / "panoptic_coco_detection_format.json"
    cli(*convert_args("coco-instances", tmp_path / "out", {"images": src / "val2017", "annotations": ann_path},
                      "--split", "val2017"))
    (sample, _), = read_samples(tmp_path / "out").values()
    doc = json.loads(ann_path.read_text())
    crowd = [a for a in doc["annotations"] if a["iscrowd"]]
    assert len(crowd) == 2 and len(sample.record.segments) == len(doc["annotations"])
    for seg in sample.record.segments:
        upstream = next(a for a in doc["annotations"] if a["id"] == seg.id)
        assert np.array_equal(masks.decode(seg.rle), mask_utils.decode(masks.to_coco(upstream["segmentation"])) > 0)
        assert seg.iscrowd == bool(upstream["iscrowd"])
    union = np.zeros_like(masks.decode(sample.record.segments[0].rle))
    for a in crowd:
        union |= mask_utils.decode(masks.to_coco(a["segmentation"])) > 0
    assert np.array_equal(masks.decode(sample.record.ignore), union)


@pytest.fixture(scope="module")
def panoptic12(tmp_path_factory, corpora):
    root = tmp_path_factory.mktemp("pan12")
    return build_panoptic(corpora, root / "coco", 12)


def test_byte_identical_for_any_worker_count_and_archives(ray_session, panoptic12, tmp_path):
    opts = ("--shard-max-samples", "3")
    cli(*convert_args("coco-panoptic", tmp_path / "w1", panoptic12, *opts, "--num-workers", "1"))
    cli(*convert_args("coco-panoptic", tmp_path / "w2", panoptic12, *opts, "--num-workers", "2"))
    # the upstream archives, read in place: val2017.zip and a tar of the panoptic PNGs
    zipped = tmp_path / "val2017.zip"
    with zipfile.ZipFile(zipped, "w") as zf:
        for p in sorted(panoptic12["images"].iterdir()):
            zf.write(p, f"val2017/{p.name}")
    tarred = tmp_path / "panoptic_val2017.tar"
    with tarfile.open(tarred, "w") as tf:
        tf.add(panoptic12["masks"], arcname="panoptic_val2017")
    archives = {**panoptic12, "images": zipped, "masks": tarred}
    cli(*convert_args("coco-panoptic", tmp_path / "arch", archives, *opts, "--num-workers", "2"))

    w1, w2, arch = (dataset_files(tmp_path / d) for d in ("w1", "w2", "arch"))
    assert len([n for n in w1 if n.startswith("shards/")]) == 4
    assert w1 == w2 == arch
    assert not (tmp_path / "w1" / "_work").exists()
    meta = json.loads(w1["dataset.json"])
    assert meta["totals"]["records_read"] == 12 == meta["totals"]["samples"]
    for forbidden in (str(tmp_path), "num_workers", os.uname().nodename):
        assert forbidden not in w1["dataset.json"].decode()
    manifest = read_parquet(open_storage(tmp_path / "w1"), MANIFEST)
    assert [row["samples"] for row in manifest] == [3, 3, 3, 3]


def test_shard_max_bytes_splits_exactly(ray_session, panoptic12, tmp_path):
    limit = 600_000  # about two records of ~230 KB each
    cli(*convert_args("coco-panoptic", tmp_path / "out", panoptic12, "--shard-max-bytes", str(limit)))
    manifest = read_parquet(open_storage(tmp_path / "out"), MANIFEST)
    assert len(manifest) > 3 and sum(r["samples"] for r in manifest) == 12
    for row in manifest:
        assert row["bytes"] <= limit
        assert (tmp_path / "out" / "shards" / row["name"]).stat().st_size == row["bytes"]


def test_rerun_of_finished_job_does_nothing(ray_session, panoptic12, tmp_path):
    args = convert_args("coco-panoptic", tmp_path / "out", panoptic12, "--shard-max-samples", "5")
    cli(*args)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*") if p.is_file()}
    output = cli(*args)
    assert "nothing to do" in output
    after = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert before == after
    # the same folder with other parameters is refused, not silently mixed
    result = runner.invoke(app, [*args[:-1], "4"])
    assert result.exit_code == 2 and "different dataset" in result.output


def test_replace_empties_a_folder_that_holds_another_dataset(ray_session, panoptic12, tmp_path):
    """--replace (what a workflow passes when a conversion it made must be redone with new inputs):
    the other dataset is deleted first; the result is exactly what a conversion into an empty folder
    writes, and --result-json names its version."""
    base = convert_args("coco-panoptic", tmp_path / "out", panoptic12, "--shard-max-samples", "5")
    cli(*base)
    other = [*base[:-1], "4"]
    refused = runner.invoke(app, other)
    assert refused.exit_code == 2 and "--replace" in refused.output
    cli(*other, "--replace", "--result-json", str(tmp_path / "result.json"))
    cli(*convert_args("coco-panoptic", tmp_path / "fresh", panoptic12, "--shard-max-samples", "4"))
    assert dataset_files(tmp_path / "out") == dataset_files(tmp_path / "fresh")
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["version"] == version_id(open_storage(tmp_path / "fresh")) and not result["already_complete"]


def test_resume_reuses_only_verified_shards(ray_session, panoptic12, tmp_path):
    params = ConvertParams(shard_max_samples=4)
    inputs = {k: str(v) for k, v in panoptic12.items()}
    cli(*convert_args("coco-panoptic", tmp_path / "reference", panoptic12, "--shard-max-samples", "4"))

    # an interrupted run: units 0 and 1 finished, then unit 0's shard was damaged on disk
    storage = open_storage(tmp_path / "out")
    converter = get_converter("coco-panoptic")(**inputs)
    prepared = prepare(converter, storage, params)
    for unit in prepared.units[:2]:
        run_unit(converter, unit, storage, params, prepared.digest, prepared.plan.categories)
    damaged = tmp_path / "out" / "shards" / "shard-000000-00.tar"
    data = bytearray(damaged.read_bytes())
    data[5000] ^= 0xFF
    damaged.write_bytes(bytes(data))

    output = cli(*convert_args("coco-panoptic", tmp_path / "out", panoptic12, "--shard-max-samples", "4"))
    assert "2 / 1" in output  # units converted / reused: unit 0 redone (hash mismatch), unit 1 reused
    assert dataset_files(tmp_path / "out") == dataset_files(tmp_path / "reference")


def test_s3_output_matches_local_and_is_readable(ray_session, bucket, panoptic12, tmp_path):
    import boto3

    opts = ("--shard-max-samples", "5")
    cli(*convert_args("coco-panoptic", tmp_path / "local", panoptic12, *opts))
    url = f"s3://{bucket}/datasets/coco-panoptic"
    cli(*convert_args("coco-panoptic", url, panoptic12, *opts))
    client = boto3.client("s3")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    remote = {
        k[len("datasets/coco-panoptic/") :]: client.get_object(Bucket=bucket, Key=k)["Body"].read()
        for k in keys
        if "/logs/" not in k
    }
    assert remote == dataset_files(tmp_path / "local")  # no temporary keys left, same bytes
    info = json.loads(cli("data", "info", url, "--json"))
    assert info["samples"] == 12 and info["version"] == version_id(open_storage(tmp_path / "local"))
    # a re-run against S3 verifies and does nothing
    assert "nothing to do" in cli(*convert_args("coco-panoptic", url, panoptic12, *opts))


def test_info_json_contract(ray_session, panoptic12, tmp_path):
    cli(*convert_args("coco-panoptic", tmp_path / "out", panoptic12, "--shard-max-samples", "5"))
    info = json.loads(cli("data", "info", str(tmp_path / "out"), "--json"))
    for key in ("schema_version", "records_read", "samples", "quarantined", "quarantined_parts", "shards",
                "by_task", "by_reason", "items"):
        assert key in info, key
    assert info["records_read"] == info["samples"] + info["quarantined"]
    assert info["shards"] == 3 and info["by_task"]["genseg"]["val2017"] == {"records": 12, "items": 12}
    rows = read_parquet(open_storage(tmp_path / "out"), INDEX)
    assert [r["key"] for r in rows] == sorted(r["key"] for r in rows)


@pytest.mark.parametrize(
    "case",
    ["bad-json", "missing-images", "missing-input", "unknown-corpus", "not-coco"],
)
def test_malformed_top_level_input_fails_fast(ray_session, panoptic12, tmp_path, case):
    inputs = dict(panoptic12)
    corpus = "coco-panoptic"
    if case == "bad-json":
        bad = tmp_path / "panoptic_val2017.json"
        bad.write_text('{"images": [')
        inputs["annotations"] = bad
        expect = [str(bad), "not valid JSON"]
    elif case == "missing-images":
        inputs["images"] = tmp_path / "nope"
        expect = ["--images", str(tmp_path / "nope")]
    elif case == "missing-input":
        inputs.pop("masks")
        expect = ["--masks"]
    elif case == "unknown-corpus":
        corpus = "coco-panoptix"
        expect = ["unknown corpus", "coco-panoptic"]
    else:
        other = tmp_path / "list.json"
        other.write_text("[]")
        inputs["annotations"] = other
        expect = [str(other), "lacks top-level keys"]
    result = runner.invoke(app, convert_args(corpus, tmp_path / "out", inputs))
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    for text in expect:
        assert text in flat, (text, result.output)
    assert not (tmp_path / "out" / "manifest.parquet").exists()


def test_s3_resume_verifies_shard_hashes(ray_session, bucket, panoptic12, tmp_path):
    import boto3

    params = ConvertParams(shard_max_samples=4)
    inputs = {k: str(v) for k, v in panoptic12.items()}
    cli(*convert_args("coco-panoptic", tmp_path / "reference", panoptic12, "--shard-max-samples", "4"))
    url = f"s3://{bucket}/ds"
    storage = open_storage(url)
    converter = get_converter("coco-panoptic")(**inputs)
    prepared = prepare(converter, storage, params)
    for unit in prepared.units[:2]:
        run_unit(converter, unit, storage, params, prepared.digest, prepared.plan.categories)
    client = boto3.client("s3")
    key = "ds/shards/shard-000001-00.tar"
    data = bytearray(client.get_object(Bucket=bucket, Key=key)["Body"].read())
    data[7000] ^= 0xFF  # same size, other bytes: only a hash notices
    client.put_object(Bucket=bucket, Key=key, Body=bytes(data))

    output = cli(*convert_args("coco-panoptic", url, panoptic12, "--shard-max-samples", "4"))
    assert "2 / 1" in output  # unit 1 redone, unit 0 reused
    remote = {
        o["Key"][len("ds/") :]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
        for o in client.list_objects_v2(Bucket=bucket)["Contents"]
        if not o["Key"].startswith("ds/logs/")
    }
    assert remote == dataset_files(tmp_path / "reference")


def test_list_corpora_names_inputs():
    output = cli("data", "list-corpora")
    for text in ("coco-panoptic", "coco-instances", "ade20k", "--annotations", "--masks", "--root"):
        assert text in output, text


def test_templates_file_replaces_the_packaged_one(ray_session, corpora, tmp_path):
    import hashlib

    from xsam.data.render import load_templates

    packaged = Path(load_templates().source).read_text()
    custom = tmp_path / "templates.yaml"
    custom.write_text(packaged.replace("Can you segment the image based on the following categories:",
                                       "Find these in the picture:"))
    src = corpora / "coco_panoptic"
    inputs = {
        "images": src / "val2017",
        "annotations": src / "annotations" / "panoptic_val2017.json",
        "masks": src / "annotations" / "panoptic_val2017",
    }
    cli(*convert_args("coco-panoptic", tmp_path / "out", inputs, "--templates", str(custom)))
    meta = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert meta["parameters"]["templates_sha256"] == hashlib.sha256(custom.read_bytes()).hexdigest()
    (sample, _), = read_samples(tmp_path / "out").values()
    assert sample.items[0].turns[0].text.startswith("<image>\nFind these in the picture: <p>")
