"""`xsam data lint` on a real converted dataset: clean passes, each kind of damage is caught and named."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import boto3
import numpy as np
import pytest
from conftest import run_cli
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from dataprep.lint import check_rle, lint_dataset
from xsam.data.masks import rle_counts
from xsam.data.manifest import (
    INDEX,
    INDEX_SCHEMA,
    MANIFEST,
    MANIFEST_SCHEMA,
    parquet_bytes,
    read_parquet,
)
from dataprep.shard_writer import ShardEntry, canonical_json, iter_shard, write_shard
from xsam.data.storage import open_storage
from pipelines.cli import app
from xsam.data.schema import RLE

KEY = "coco-panoptic-val2017-000000439180"
SHARD = "shards/shard-000000-00.tar"
runner = CliRunner()






@pytest.fixture()
def copy(panoptic, tmp_path) -> Path:
    dst = tmp_path / "ds"
    shutil.copytree(panoptic, dst, ignore=shutil.ignore_patterns("logs"))
    return dst


def lint_cli(path: Path | str, *extra: str):
    return runner.invoke(app, ["data", "lint", str(path), *extra])


def checks(report) -> set[str]:
    return {p.check for p in report.problems}


def rewrite_shard(root: Path, edit) -> None:
    """Re-tar the shard with `edit(sample_dict)` applied to each KEY.json; patch the manifest to match."""
    with open(root / SHARD, "rb") as f:
        samples = iter_shard(f)
    entries = []
    for key, members in samples:
        sample = json.loads(members["json"])
        edit(sample)
        image_ext = "jpg" if "jpg" in members else "png"
        entries.append(ShardEntry(key=key, image_ext=image_ext, image=members[image_ext], sample_json=canonical_json(sample)))
    buf = io.BytesIO()
    write_shard(buf, entries)
    data = buf.getvalue()
    (root / SHARD).write_bytes(data)
    storage = open_storage(root)
    rows = read_parquet(storage, MANIFEST)
    rows[0].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (root / MANIFEST).write_bytes(parquet_bytes(rows, MANIFEST_SCHEMA))


def test_clean_dataset_passes_real_cli(panoptic):
    proc = run_cli("data", "lint", str(panoptic), check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok" in proc.stdout and "1 samples" in proc.stdout

    report = lint_dataset(open_storage(panoptic), verify="full")
    assert report.ok, report.problems
    assert (report.shards, report.samples, report.items) == (1, 1, 1)
    assert report.masks == 33  # 32 segments + the ignore mask

    result = lint_cli(panoptic, "--json")
    assert result.exit_code == 0
    assert json.loads(result.output)["ok"] is True


def test_flipped_byte_in_shard(copy):
    path = copy / SHARD
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))

    result = lint_cli(copy)
    assert result.exit_code == 1
    assert f"Error in shard {SHARD}: sha256 mismatch (manifest " in result.output
    report = lint_dataset(open_storage(copy))
    assert "shard_sha256" in checks(report)
    assert all(p.where == SHARD for p in report.problems if p.check.startswith("shard"))


def test_deleted_index_row(copy):
    storage = open_storage(copy)
    rows = read_parquet(storage, INDEX)
    (copy / INDEX).write_bytes(parquet_bytes([r for r in rows if r["key"] != KEY], INDEX_SCHEMA))

    result = lint_cli(copy)
    assert result.exit_code == 1
    assert f"Error in shard {SHARD}, sample {KEY}: the sample has no row in index.parquet" in result.output
    report = lint_dataset(storage)
    assert {"index_missing_row", "totals"} <= checks(report)


def _rename_category(sample: dict) -> None:
    sample["record"]["segments"][1]["category_name"] = "zebra"


def _truncate_mask(sample: dict) -> None:
    rle = sample["record"]["segments"][3]["rle"]
    rle["counts"] = rle["counts"][: len(rle["counts"]) // 2]


def _foreign_key(sample: dict) -> None:
    other = "coco-panoptic-val2017-000000000001"  # a valid sample, stored under the wrong KEY
    sample["record"]["key"] = other
    for i, item in enumerate(sample["items"]):
        item.update(record_key=other, key=f"{other}#{i}")


def _bad_item(sample: dict) -> None:
    sample["items"][0]["segs"][0]["targets"][0]["segment"] = 99


@pytest.mark.parametrize(
    ("edit", "expected", "text"),
    [
        (_rename_category, {"index_sample_sha256"}, "index.parquet says"),
        (_truncate_mask, {"mask", "index_sample_sha256"}, "segment 3 (id 3604684): "),
        (_foreign_key, {"sample_key", "index_sample_sha256"}, "holds record.key"),
        (_bad_item, {"sample_json", "index_sample_sha256"}, "does not validate as ShardSample"),
    ],
    ids=["category", "mask", "key", "item"],
)
def test_tampered_json_with_patched_manifest(copy, edit, expected, text):
    rewrite_shard(copy, edit)
    report = lint_dataset(open_storage(copy))
    assert not {"shard_sha256", "shard_bytes"} & checks(report)  # the manifest matches the new tar
    assert expected <= checks(report), report.problems
    assert all(p.key == KEY for p in report.problems if p.check in expected)

    result = lint_cli(copy)
    assert result.exit_code == 1
    assert f"Error in shard {SHARD}, sample {KEY}: " in result.output
    assert text in result.output


def test_bad_members(copy):
    """Members a WebDataset reader would mis-group: stray extension, link, duplicate, split key."""
    with open(copy / SHARD, "rb") as f:
        ((key, members),) = iter_shard(f)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add(f"{key}.jpg", members["jpg"])
        add(f"{key}.json", members["json"])
        add(f"{key}.json", members["json"])
        add(f"{key}.txt", b"hello")
        link = tarfile.TarInfo(f"{key}.png")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
        add("Bad.Key.json", b"{}")
        add(f"{key}.jpg", members["jpg"])  # the key again, after another key
    data = buf.getvalue()
    (copy / SHARD).write_bytes(data)
    rows = read_parquet(open_storage(copy), MANIFEST)
    rows[0].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (copy / MANIFEST).write_bytes(parquet_bytes(rows, MANIFEST_SCHEMA))

    report = lint_dataset(open_storage(copy))
    found = {(p.check, p.key) for p in report.problems}
    assert {
        ("member_duplicate", KEY),
        ("member_name", KEY),
        ("member_type", KEY),
        ("member_name", "Bad"),
        ("member_order", KEY),
        ("duplicate_key", KEY),
        ("manifest_samples", None),
    } <= found, report.problems
    assert not {"shard_sha256", "index_sample_sha256"} & {p.check for p in report.problems}


def test_missing_shard_and_broken_totals(copy):
    (copy / SHARD).unlink()
    meta = json.loads((copy / "dataset.json").read_text())
    meta["totals"]["records_read"] += 1
    (copy / "dataset.json").write_text(json.dumps(meta))

    report = lint_dataset(open_storage(copy))
    messages = [p.render() for p in report.problems]
    assert f"Error in shard {SHARD}: listed in manifest.parquet but the file does not exist" in messages
    assert any("records_read 2 != samples 1 + quarantined 0" in m for m in messages)
    # the index row pointing into the missing shard is not reported a second time
    assert "index_missing_sample" not in checks(report)


def test_lint_on_s3(panoptic, bucket):
    client = boto3.client("s3")
    for path in sorted(panoptic.rglob("*")):
        if path.is_file() and "logs" not in path.parts:
            client.upload_file(str(path), bucket, f"ds/{path.relative_to(panoptic).as_posix()}")
    url = f"s3://{bucket}/ds"
    report = lint_dataset(open_storage(url))
    assert report.ok, report.problems
    assert report.samples == 1

    client.put_object(Bucket=bucket, Key="ds/shards/stray.tar", Body=b"x")
    result = lint_cli(url)
    assert result.exit_code == 1
    assert "Error in shard shards/stray.tar: the file is not listed in manifest.parquet" in result.output


def test_rle_counts_matches_pycocotools():
    rng = np.random.default_rng(0)
    for _ in range(50):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        mask = rng.random((h, w)) < rng.random()
        coco = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        runs = rle_counts(coco["counts"].decode())
        flat = np.repeat(np.arange(runs.size) % 2, runs).astype(bool)
        assert (flat.reshape(w, h).T == mask).all()
        assert check_rle(RLE(size=(h, w), counts=coco["counts"].decode()), h, w, decode=True) is None
    # runs that fall short of the mask: pycocotools would decode uninitialised memory
    assert "cover 0 pixels" in check_rle(RLE(size=(2, 2), counts="0"), 2, 2)
    assert "invalid character" in check_rle(RLE(size=(2, 2), counts="0 1"), 2, 2)
    assert "size [2, 3]" in check_rle(RLE(size=(2, 3), counts="6"), 2, 2)
