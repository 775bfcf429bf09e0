"""`xsam data diff`: a dataset against itself, and against a re-conversion from edited inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from builders import convert_once, panoptic_inputs
from typer.testing import CliRunner

from dataprep.convert import ConvertParams
from dataprep.diff import DiffInputError, diff_datasets
from xsam.data.manifest import version_id
from xsam.data.storage import open_storage
from pipelines.cli import app

KEY = "coco-panoptic-val2017-000000439180"
NEW_KEY = "coco-panoptic-val2017-000000900001"
runner = CliRunner()


@pytest.fixture(scope="module")
def old(panoptic) -> Path:
    return panoptic


@pytest.fixture(scope="module")
def new(ray_session, corpora, tmp_path_factory) -> Path:
    """Edited upstream JSON: one segment re-labelled, the image listed again under a new id; and
    a different --shard-max-samples."""
    root = corpora / "coco_panoptic"
    doc = json.loads((root / "annotations" / "panoptic_val2017.json").read_text())
    ann = doc["annotations"][0]
    person = next(s for s in ann["segments_info"] if s["category_id"] == 1 and not s["iscrowd"])
    person["category_id"] = 2  # person -> bicycle
    doc["images"].append({**doc["images"][0], "id": 900001})
    doc["annotations"].append({**json.loads(json.dumps(ann)), "image_id": 900001})
    edited = tmp_path_factory.mktemp("edited") / "panoptic_val2017.json"
    edited.write_text(json.dumps(doc))
    params = ConvertParams(shard_max_samples=500)
    return convert_once(tmp_path_factory, "coco-panoptic-edited", "coco-panoptic", panoptic_inputs(root, edited), params)


def test_same_dataset_is_all_unchanged(old):
    report = diff_datasets(open_storage(old), open_storage(old))
    assert report["counts"] == {"added": 0, "removed": 0, "changed": 0, "unchanged": 1}
    assert report["same_version"] is True
    assert report["old"]["version"] == version_id(open_storage(old))
    assert report["parameters"] == report["inputs"] == report["meta"] == []
    assert report["by_task"] == [
        {"task": "genseg", "split": "val2017", "added": 0, "removed": 0, "changed": 0, "unchanged": 1}
    ]


def test_edited_inputs_show_changed_and_added(old, new):
    report = diff_datasets(open_storage(old), open_storage(new))
    assert report["counts"] == {"added": 1, "removed": 0, "changed": 1, "unchanged": 0}
    assert report["keys"] == {"added": [NEW_KEY], "removed": [], "changed": [KEY]}
    assert report["changed_what"] == {KEY: ["sample"]}  # same image bytes, different record
    assert report["same_version"] is False
    assert report["old"]["version"] != report["new"]["version"]
    params = {p["name"]: (p["old"], p["new"]) for p in report["parameters"]}
    assert params == {"shard_max_samples": (1000, 500)}
    (inp,) = report["inputs"]  # same file name, other bytes
    assert inp["name"] == "annotations.sha256" and inp["old"] != inp["new"]
    assert report["meta"] == []

    back = diff_datasets(open_storage(new), open_storage(old))
    assert back["counts"] == {"added": 0, "removed": 1, "changed": 1, "unchanged": 0}
    assert back["keys"]["removed"] == [NEW_KEY]


def test_diff_cli(old, new, tmp_path):
    result = runner.invoke(app, ["data", "diff", str(old), str(new), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["keys"]["added"] == [NEW_KEY]

    result = runner.invoke(app, ["data", "diff", str(old), str(new)])
    assert result.exit_code == 0, result.output
    text = result.output
    for needle in ("added (1):", NEW_KEY, "changed (1):", KEY, "(sample differs)", "shard_max_samples", "annotations.sha256"):
        assert needle in text, needle

    missing = runner.invoke(app, ["data", "diff", str(old), str(tmp_path / "nowhere")])
    assert missing.exit_code == 2
    assert "not a complete dataset" in missing.output.replace("\n", " ")
    with pytest.raises(DiffInputError):
        diff_datasets(open_storage(tmp_path / "nowhere"), open_storage(old))


def test_diff_and_preview_read_s3_datasets(old, new, bucket, tmp_path):
    import boto3

    client = boto3.client("s3")
    for path in sorted(old.rglob("*")):
        if path.is_file() and "logs" not in path.parts:
            client.upload_file(str(path), bucket, f"old/{path.relative_to(old).as_posix()}")
    url = f"s3://{bucket}/old"
    result = runner.invoke(app, ["data", "diff", url, str(new), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["counts"] == {"added": 1, "removed": 0, "changed": 1, "unchanged": 0}
    png = tmp_path / "preview.png"
    result = runner.invoke(app, ["data", "preview", url, "--key", KEY, "--png", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
