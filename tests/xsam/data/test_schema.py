"""Tests of the sample contract (xsam.data.schema) and of its committed JSON Schemas."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from xsam.data import masks
from xsam.data.schema import (
    SCHEMA_VERSION,
    Image,
    Item,
    Record,
    SegAnswer,
    Segment,
    SegTarget,
    ShardSample,
    Source,
    Span,
    Turn,
    json_schemas,
    make_key,
)
from xsam.data.schema_docs import main as write_schema_docs
from xsam.data.schema_docs import schema_files

REPO = Path(__file__).resolve().parents[3]
H, W = 4, 6


def segment(height: int = H, width: int = W, seg_id: int = 1) -> Segment:
    mask = np.zeros((height, width), bool)
    mask[1:3, 2:4] = True
    rle = masks.encode(mask)
    return Segment(id=seg_id, rle=rle, category_id=1, bbox=masks.bbox(rle), area=masks.area(rle))


def record_fields(**overrides: object) -> dict:
    fields = {
        "key": make_key("tiny", "val", 7),
        "task": "refseg",
        "source": Source(corpus="tiny", split="val", upstream_ids={"image_id": 7}, annotation_file="a.json",
                         annotation_sha256="0" * 64),
        "image": Image(ext="png", sha256="0" * 64, bytes=10, width=W, height=H, file_name="7.png"),
        "segments": [segment()],
        "phrases": ["the square"],
        "meta": {"phrase_segments": [[0]]},
    }
    return {**fields, **overrides}


def item_fields(**overrides: object) -> dict:
    fields = {
        "key": "tiny-val-000000000007#0",
        "record_key": "tiny-val-000000000007",
        "task": "refseg",
        "mode": "eval",
        "seed": 0,
        "epoch": 0,
        "index": 0,
        "turns": [Turn(role="user", text="<image>\nSegment <p>the square</p>."), Turn(role="assistant", text="<SEG>.")],
        "spans": [Span(turn=0, phrase_index=0)],
        "segs": [SegAnswer(turn=1, targets=[SegTarget(segment=0, span=0)])],
    }
    return {**fields, **overrides}


def test_valid_record_and_item_round_trip() -> None:
    record = Record(**record_fields())
    assert record.schema_version == SCHEMA_VERSION
    assert Record.model_validate_json(record.model_dump_json()) == record
    item = Item(**item_fields())
    sample = ShardSample(record=record, items=[item])
    assert ShardSample.model_validate_json(sample.model_dump_json(by_alias=True)) == sample


@pytest.mark.parametrize("key", ["a.b", "Coco-val", "a b", "", "a#0"])
def test_record_rejects_bad_keys(key: str) -> None:
    with pytest.raises(ValidationError, match="must match"):
        Record(**record_fields(key=key))


def test_make_key_pads_ids_and_replaces_dots() -> None:
    assert make_key("coco-panoptic", "val2017", 439180) == "coco-panoptic-val2017-000000439180"
    assert make_key("refcoco+", "testA", 5) == "refcoco_-testa-000000000005"
    assert "." not in make_key("ade20k", "v1.0", 1)


def test_record_rejects_mask_image_size_mismatch() -> None:
    with pytest.raises(ValidationError, match=r"mask size \[5, 6\] != image \[h, w\] \[4, 6\]"):
        Record(**record_fields(segments=[segment(height=5)]))
    with pytest.raises(ValidationError, match="ignore mask size"):
        Record(**record_fields(ignore=masks.encode(np.zeros((W, H), bool))))


def test_record_rejects_duplicate_segment_ids_and_extra_fields() -> None:
    with pytest.raises(ValidationError, match="unique"):
        Record(**record_fields(segments=[segment(), segment()]))
    with pytest.raises(ValidationError, match="Extra inputs"):
        Record(**record_fields(notes="x"))


def test_item_rejects_seg_count_mismatch() -> None:
    two_segs = [Turn(role="user", text="<image>\nSegment <p>the square</p>."),
                Turn(role="assistant", text="<SEG> and <SEG>.")]
    with pytest.raises(ValidationError, match="2 <SEG> in its text but 1 answers"):
        Item(**item_fields(turns=two_segs))
    with pytest.raises(ValidationError, match="1 <p> spans in its text but 0 spans"):
        Item(**item_fields(spans=[], segs=[SegAnswer(turn=1)]))
    with pytest.raises(ValidationError, match="not an answer turn"):
        Item(**item_fields(segs=[SegAnswer(turn=0)]))
    with pytest.raises(ValidationError, match="must be 'tiny-val-000000000007#0'"):
        Item(**item_fields(key="tiny-val-000000000007#1"))


def test_committed_json_schemas_are_in_sync() -> None:
    files = schema_files()
    assert sorted(files) == [f"{name}.schema.json" for name in sorted(json_schemas())]
    for name, text in files.items():
        committed = REPO / "docs" / "schema" / name
        assert committed.read_text(encoding="utf-8") == text, (
            f"{committed} is stale: run `python -m xsam.data.schema_docs` from the repository root"
        )


def test_schema_docs_writes_and_checks(tmp_path: Path) -> None:
    out = tmp_path / "schema"
    assert write_schema_docs(["--out-dir", str(out), "--check"]) == 1  # nothing written yet
    assert write_schema_docs(["--out-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(schema_files())
    assert write_schema_docs(["--out-dir", str(out), "--check"]) == 0
