"""LLaVA conversations end to end on the example file derived from the real COCO samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from builders import dataset_files, read_samples

from dataprep.convert import ConvertParams
from dataprep.converters.llava import Llava, split_from_file_name
from dataprep.examples.llava import FILE, build, entries
from dataprep.lint import lint_dataset
from xsam.data.manifest import QUARANTINE, read_parquet
from dataprep.quarantine import InputError
from xsam.data.storage import open_storage
from jobs.convert import run_conversion
from xsam.data.schema import IMAGE_TOKEN


@pytest.fixture(scope="module")
def example(tmp_path_factory, corpora) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("llava")
    return root, build(corpora, root / "ex")["llava"]


@pytest.fixture(scope="module")
def converted(example, ray_session, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("out") / "a"
    outcome = run_conversion("llava", str(out), example[1], ConvertParams(), num_workers=1)
    return out, outcome.meta


def test_round_trip_and_text_only(converted, example):
    out, meta = converted
    totals = meta["totals"]
    assert totals["records_read"] == totals["samples"] + totals["quarantined"] == 4
    assert totals["quarantined"] == 1 and meta["splits"] == ["instruct"] and meta["task"] == "chat"
    rows = read_parquet(open_storage(out), QUARANTINE)
    assert [(r["record_id"], r["reason"], r["level"]) for r in rows] == [("i6IyJda_0", "text_only", "record")]
    samples = read_samples(out)
    upstream = {e["id"]: e for e in entries() if "image" in e}
    keys = {f"llava-instruct-{i.lower().replace('.', '_')}": i for i in upstream}
    assert sorted(samples) == sorted(keys)
    images = Path(example[1]["images"])
    for key, uid in keys.items():
        sample, members = samples[key]
        rec, entry = sample.record, upstream[uid]
        # conversations round-trip exactly (aliases, order, values incl. <image> and newlines)
        assert [t.model_dump(by_alias=True) for t in rec.conversations] == entry["conversations"]
        assert rec.source.upstream_ids == {"id": uid} and rec.segments == [] and rec.ignore is None
        assert members[rec.image.ext] == (images / entry["image"]).read_bytes()
        (item,) = sample.items
        assert len(item.turns) == len(entry["conversations"]) and item.segs == [] and item.spans == []
        assert item.turns[0].text.startswith(IMAGE_TOKEN)
        assert sum(t.text.count(IMAGE_TOKEN) for t in item.turns) == 1
        assert [t.role for t in item.turns] == ["user", "assistant"] * (len(item.turns) // 2)
    assert lint_dataset(open_storage(out)).ok


def test_byte_identical(converted, example, ray_session, tmp_path):
    out, _ = converted
    run_conversion("llava", str(tmp_path / "b"), example[1], ConvertParams(), num_workers=1)
    assert dataset_files(out) == dataset_files(tmp_path / "b")


def test_keep_text_only_keeps_image_less_records(example, ray_session, tmp_path):
    out = tmp_path / "kept"
    outcome = run_conversion("llava", str(out), {**example[1], "keep_text_only": True}, ConvertParams(), num_workers=1)
    totals = outcome.meta["totals"]
    assert totals["records_read"] == totals["samples"] == 4 and totals["quarantined"] == 0
    sample, members = read_samples(out)["llava-instruct-i6iyjda_0"]
    assert sample.record.image is None and set(members) == {"json"}  # KEY.json alone
    text_only = next(e for e in entries() if "image" not in e)
    assert [t.model_dump(by_alias=True) for t in sample.record.conversations] == text_only["conversations"]
    (item,) = sample.items
    assert all(IMAGE_TOKEN not in t.text for t in item.turns)  # no <image> without an image
    assert lint_dataset(open_storage(out)).ok
    png = tmp_path / "text-only.png"
    from typer.testing import CliRunner

    from pipelines.cli import app

    result = CliRunner().invoke(app, ["data", "preview", str(out), "--key", "llava-instruct-i6iyjda_0", "--png", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_split_from_file_name(example, tmp_path):
    assert split_from_file_name("blip_laion_cc_sbu_558k.json") == "pretrain"
    assert split_from_file_name("/x/llava_v1_5_mix665k.json") == "instruct"
    assert split_from_file_name("my_chat.json") is None
    other = tmp_path / "my_chat.json"
    other.write_text("[]")
    assert Llava(annotations=str(other), images="x").parameters() == {"split": "default"}
    assert Llava(annotations=str(other), images="x", split="Mine").parameters() == {"split": "mine"}
    with pytest.raises(InputError, match="contradicts"):
        Llava(annotations=example[1]["annotations"], images="x", split="pretrain")


def test_quarantine_paths(example, ray_session, tmp_path):
    data = entries()
    first = data[0]
    data += [
        {**first, "id": "dup.id"},
        {**first, "id": "DUP_id"},  # same key as "dup.id" after make_key
        {**first, "id": "000000039769"},  # the same id again
        {**first, "id": "missing", "image": "coco/val2017/nope.jpg"},
        {"id": "bad_turn", "image": first["image"], "conversations": [{"from": "system", "value": "x"}]},
        {**first, "id": "seg_in_text", "conversations": [{"from": "human", "value": "<image>\n<SEG>?"}]},
    ]
    ann = tmp_path / FILE
    ann.write_text(json.dumps(data))
    out = tmp_path / "out"
    outcome = run_conversion("llava", str(out), {"annotations": str(ann), "images": example[1]["images"]},
                             ConvertParams(), num_workers=1)
    totals = outcome.meta["totals"]
    assert totals["records_read"] == totals["samples"] + totals["quarantined"] == len(data)
    rows = sorted((r["record_id"], r["reason"]) for r in read_parquet(open_storage(out), QUARANTINE))
    assert rows == [
        ("000000039769", "duplicate_id"),
        ("DUP_id", "duplicate_id"),
        ("bad_turn", "invalid_annotation"),
        ("i6IyJda_0", "text_only"),
        ("missing", "missing_file"),
        ("seg_in_text", "invalid_annotation"),
    ]
    assert "llava-instruct-dup_id" in read_samples(out)
