"""Bad input is quarantined with a reason and the run goes on; nothing is ever lost.

Every broken input is built in the test FROM the real COCO samples (tests/builders.py) by one
precise damage, and the conversion must put exactly that record (or part) in quarantine.parquet
with the expected reason, write every other record, and satisfy
`records_read == samples + quarantined`.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import zlib

import pytest
from builders import build_instances, build_panoptic, load_json, read_records
from PIL import Image as PILImage
from pycocotools import mask as mask_utils

from dataprep.convert import ConvertParams
from xsam.data.manifest import INDEX, QUARANTINE, read_parquet
from xsam.data import masks
from xsam.data.masks import rle_counts
from dataprep.lint import lint_dataset
from xsam.data.storage import open_storage
from jobs.convert import run_conversion


def _png_bomb() -> bytes:
    """A structurally valid PNG whose header declares 100000 x 100000 pixels."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _flip_idat_byte(png: bytes) -> bytes:
    at = png.index(b"IDAT") + 4 + 100  # a byte inside the first IDAT payload
    data = bytearray(png)
    data[at] ^= 0x55
    return bytes(data)


def _undecodable_jpeg(jpeg: bytes) -> bytes:
    """Structure intact (markers, EOI), but the frame points at an undefined quantisation table."""
    sof = jpeg.index(b"\xff\xc0")
    data = bytearray(jpeg)
    data[sof + 2 + 8 + 2] = 3
    return bytes(data)


def _rows(out) -> tuple[dict, list[dict], list[dict]]:
    storage = open_storage(out)
    meta = json.loads(storage.get_bytes("dataset.json"))
    return meta, read_parquet(storage, INDEX), read_parquet(storage, QUARANTINE)


@pytest.fixture(scope="module")
def broken_panoptic(tmp_path_factory, corpora):
    root = tmp_path_factory.mktemp("broken-pan")
    paths = build_panoptic(corpora, root, 10)
    images, masks = paths["images"], paths["masks"]
    doc = load_json(paths["annotations"])
    img = {i["id"]: i for i in doc["images"]}
    ann = {a["image_id"]: a for a in doc["annotations"]}
    (images / "000000000002.jpg").unlink()  # missing_file
    jpg3 = images / "000000000003.jpg"
    jpg3.write_bytes(jpg3.read_bytes()[: 60_000])  # truncated_image
    png4 = masks / "000000000004.png"
    png4.write_bytes(_flip_idat_byte(png4.read_bytes()))  # corrupt_image (CRC)
    (images / "000000000005.jpg").write_bytes(_png_bomb())  # decompression_bomb
    img[6]["width"], img[6]["height"] = 320, 180  # size_mismatch: annotations vs header
    small = PILImage.open(masks / "000000000007.png").resize((320, 180), PILImage.NEAREST)
    small.save(masks / "000000000007.png")  # size_mismatch: mask vs image
    (root / "escape.jpg").write_bytes((images / "000000000001.jpg").read_bytes())
    img[8]["file_name"] = "../escape.jpg"  # unsafe_path
    segs9 = ann[9]["segments_info"]
    segs9[0]["category_id"] = 9999  # part: unknown_category
    dropped = segs9.pop(1)  # part: unlisted_segment (its pixels remain in the PNG)
    doc["images"].append(dict(img[1]))  # duplicate_id (record)
    doc["annotations"].append({**ann[10], "image_id": 777})  # orphan_annotation (record)
    doc["images"].append({**img[10], "id": 11, "file_name": "000000000010.jpg"})  # missing_annotation
    doc["images"].append({"id": 12, "width": 640, "height": 360})  # invalid_annotation: no file_name
    ann[10]["segments_info"].append({**ann[10]["segments_info"][0], "id": 4242})  # part: empty_mask
    paths["annotations"].write_text(json.dumps(doc))
    out = root / "out"
    run_conversion("coco-panoptic", str(out), {k: str(v) for k, v in paths.items()},
                   ConvertParams(shard_max_samples=4), num_workers=2)
    return {"out": out, "dropped_segment": dropped["id"], "crowd": segs9[0]["id"], "paths": paths}


def test_every_panoptic_reason_is_quarantined(ray_session, broken_panoptic):
    meta, index, quarantine = _rows(broken_panoptic["out"])
    totals = meta["totals"]
    assert totals["records_read"] == 14  # 12 image entries + 1 duplicate + 1 orphan annotation
    assert totals["records_read"] == totals["samples"] + totals["quarantined"]
    assert [r["key"][-2:] for r in index] == ["01", "09", "10"]
    records = {(q["record_id"], q["reason"]) for q in quarantine if q["level"] == "record"}
    assert records == {
        ("1", "duplicate_id"),
        ("2", "missing_file"),
        ("3", "truncated_image"),
        ("4", "corrupt_image"),
        ("5", "decompression_bomb"),
        ("6", "size_mismatch"),
        ("7", "size_mismatch"),
        ("8", "unsafe_path"),
        ("777", "orphan_annotation"),
        ("11", "missing_annotation"),
        ("images[12]", "invalid_annotation")  # 0-based position in `images`,
    }
    parts = {(q["record_id"], q["part_id"], q["reason"]) for q in quarantine if q["level"] == "part"}
    assert parts == {
        ("9", str(broken_panoptic["crowd"]), "unknown_category"),
        ("9", str(broken_panoptic["dropped_segment"]), "unlisted_segment"),
        ("10", "4242", "empty_mask"),
    }
    assert totals["quarantined_parts"] == 3
    for q in quarantine:  # every message says what was wrong, concretely
        assert len(q["message"]) > 20 and q["source_file"]
    by_id = {q["record_id"]: q["message"] for q in quarantine if q["level"] == "record"}
    assert "EOI" in by_id["3"] or "truncated" in by_id["3"]
    assert "100000" in by_id["5"]


def test_info_reports_reasons(ray_session, broken_panoptic):
    from typer.testing import CliRunner

    from pipelines.cli import app

    result = CliRunner().invoke(app, ["data", "info", str(broken_panoptic["out"]), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["quarantined"] == 11 and info["quarantined_parts"] == 3 and info["samples"] == 3
    assert info["by_reason"]["size_mismatch"] == 2 and info["by_reason"]["unlisted_segment"] == 1


def test_instances_part_level_reasons(ray_session, corpora, tmp_path):
    paths = build_instances(corpora, tmp_path / "coco", 3)
    doc = load_json(paths["annotations"])
    anns = doc["annotations"]
    first = [a for a in anns if a["image_id"] == 1]
    first[0]["segmentation"] = [[10.0, 10.0, 20.0, 20.0]]  # two points: degenerate_polygon
    first[1]["category_id"] = 4242  # unknown_category
    first[2]["segmentation"] = {"size": [10, 10], "counts": "0"}  # size_mismatch (part)
    anns.append({**first[3], "id": first[3]["id"]})  # duplicate_id (part)
    anns.append({**first[4], "id": 99999, "image_id": 555})  # orphan_annotation (part)
    (paths["images"] / "000000000003.png").write_bytes(os.urandom(5000))  # unsupported_format
    paths["annotations"].write_text(json.dumps(doc))
    run_conversion("coco-instances", str(tmp_path / "out"), {k: str(v) for k, v in paths.items()},
                   ConvertParams(), num_workers=1)
    meta, index, quarantine = _rows(tmp_path / "out")
    assert meta["totals"]["records_read"] == 3 == meta["totals"]["samples"] + meta["totals"]["quarantined"]
    assert {(q["level"], q["reason"]) for q in quarantine} == {
        ("part", "degenerate_polygon"),
        ("part", "unknown_category"),
        ("part", "size_mismatch"),
        ("part", "duplicate_id"),
        ("part", "orphan_annotation"),
        ("record", "unsupported_format"),
    }
    per_key = {r["key"][-2:]: r["segments"] for r in index}
    assert per_key == {"01": 6 - 3, "02": 6}  # image 1 lost exactly its three bad annotations


def test_rle_runs_short_of_the_image(ray_session, corpora, tmp_path):
    """A real mask's RLE with its last run cut off: its runs cover less than the image, and
    pycocotools would decode the rest from uninitialised memory. `--verify full` quarantines it
    (part, invalid_annotation); the default structural pass keeps upstream RLE strings as they are,
    and then lint names it and decoding refuses it instead of returning garbage."""
    paths = build_instances(corpora, tmp_path / "coco", 2, sample="rle")
    doc = load_json(paths["annotations"])
    image = next(i for i in doc["images"] if i["id"] == 1)
    h, w = image["height"], image["width"]
    ann = next(a for a in doc["annotations"] if a["image_id"] == 1)
    runs = rle_counts(ann["segmentation"]["counts"]).tolist()
    short = mask_utils.frPyObjects({"size": [h, w], "counts": runs[:-1]}, h, w)
    ann["segmentation"] = {"size": [h, w], "counts": short["counts"].decode()}
    paths["annotations"].write_text(json.dumps(doc))
    inputs = {k: str(v) for k, v in paths.items()}
    run_conversion("coco-instances", str(tmp_path / "full"), inputs, ConvertParams(verify="full"), num_workers=1)
    meta, index, quarantine = _rows(tmp_path / "full")
    assert [(q["level"], q["reason"], q["part_id"]) for q in quarantine] == [
        ("part", "invalid_annotation", str(ann["id"]))]
    assert f"RLE runs cover {sum(runs[:-1])} pixels, the mask has {h * w}" in quarantine[0]["message"]
    assert meta["totals"]["samples"] == 2
    run_conversion("coco-instances", str(tmp_path / "structural"), inputs, ConvertParams(), num_workers=1)
    report = lint_dataset(open_storage(str(tmp_path / "structural")))
    assert not report.ok and f"RLE runs cover {sum(runs[:-1])} pixels" in str(report.problems)
    (record,) = [s.record for k, s in read_records(tmp_path / "structural").items() if k.endswith("01")]
    (seg,) = [s for s in record.segments if s.id == ann["id"]]
    with pytest.raises(ValueError, match="RLE runs cover"):
        masks.decode(seg.rle)


def test_archive_links_and_escaping_members_are_refused(ray_session, corpora, tmp_path):
    paths = build_panoptic(corpora, tmp_path / "coco", 3)
    doc = load_json(paths["annotations"])
    doc["images"][2]["file_name"] = "../escape.jpg"
    paths["annotations"].write_text(json.dumps(doc))
    tarred = tmp_path / "val2017.tar"
    with tarfile.open(tarred, "w") as tf:
        tf.add(paths["images"] / "000000000001.jpg", arcname="val2017/000000000001.jpg")
        link = tarfile.TarInfo("val2017/000000000002.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
        data = (paths["images"] / "000000000003.jpg").read_bytes()
        evil = tarfile.TarInfo("val2017/../escape.jpg")
        evil.size = len(data)
        tf.addfile(evil, io.BytesIO(data))
    inputs = {**{k: str(v) for k, v in paths.items()}, "images": str(tarred)}
    run_conversion("coco-panoptic", str(tmp_path / "out"), inputs, ConvertParams(), num_workers=1)
    meta, index, quarantine = _rows(tmp_path / "out")
    assert [r["key"][-2:] for r in index] == ["01"]
    assert {(q["record_id"], q["reason"]) for q in quarantine} == {("2", "unsafe_path"), ("3", "unsafe_path")}
    assert not (tmp_path / "escape.jpg").exists() and not (tmp_path / "out" / "escape.jpg").exists()


def test_verify_full_decodes_what_structure_cannot_see(ray_session, corpora, tmp_path):
    paths = build_panoptic(corpora, tmp_path / "coco", 2)
    jpg = paths["images"] / "000000000002.jpg"
    jpg.write_bytes(_undecodable_jpeg(jpg.read_bytes()))
    inputs = {k: str(v) for k, v in paths.items()}
    run_conversion("coco-panoptic", str(tmp_path / "cheap"), inputs, ConvertParams(), num_workers=1)
    run_conversion("coco-panoptic", str(tmp_path / "full"), inputs, ConvertParams(verify="full"), num_workers=1)
    assert _rows(tmp_path / "cheap")[0]["totals"]["samples"] == 2
    meta, _, quarantine = _rows(tmp_path / "full")
    assert meta["totals"]["samples"] == 1
    assert [(q["record_id"], q["reason"]) for q in quarantine] == [("2", "corrupt_image")]
