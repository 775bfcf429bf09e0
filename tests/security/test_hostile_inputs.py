"""The hostile-input corpus (issue 9): one corpus per upstream format, each built in a temp folder FROM
the real samples (tests/builders.py) by copying good records and adding one bad record per hostile case.

Each corpus is converted once, in this process (`builders.convert_local`, no Ray). For every case the
bad record is in `quarantine.parquet` with the expected reason and a message naming the problem, every
good record is written (in the index and in the shards), and `records_read == samples + quarantined`.
Inputs that must stop the run (an annotation file that is not JSON at all, not UTF-8, nested 10^5
deep, or not a COCO document; an images "archive" that is not one) are refused by `xsam data convert`
with exit code 2 and a message naming the file, and nothing is written; so is an annotation file
declaring 2 GB (sparse: refused from its size, never read). A record's file over 1 GiB (a sparse image
in a folder, a zip member whose directory entry declares 2 GB) is quarantined as `file_too_large`
without being read or inflated.

What the neighbouring tests already cover is not repeated here:
- tests/dataprep/test_quarantine.py: panoptic missing file, truncated JPEG, PNG CRC, PNG image bomb,
  size mismatches, `../` file name, duplicate image id, unknown/unlisted/empty segments; instances
  part-level reasons (2-point polygon, unknown category, RLE size, duplicate annotation id, orphan);
  a tar of images with a symlink and a `../` member; `--verify full`.
- tests/dataprep/test_sources.py: the tree readers (folder/zip/tar) refusing unsafe names and links.
- tests/dataprep/test_imagecheck.py: the structural image check byte by byte.
- tests/security/test_unsafe_calls.py and tests/dataprep/test_refer.py: pickles.
"""

from __future__ import annotations

import json
import os
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import pytest
from builders import build_instances, build_panoptic, convert_local, load_json, read_samples, tar_add, tar_link
from conftest import CORPORA, invoke_cli

from dataprep.convert import ConvertParams
from xsam.data.manifest import DATASET, INDEX, QUARANTINE, read_parquet
from xsam.data.storage import open_storage

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ---- damage, always applied to real bytes ---------------------------------------------------------


def with_ihdr_size(png: bytes, width: int, height: int) -> bytes:
    """The real PNG with its IHDR declaring `width` x `height` (CRC recomputed: structurally valid)."""
    assert png[:8] == PNG_SIGNATURE and png[12:16] == b"IHDR"
    ihdr = bytearray(png[16:29])
    struct.pack_into(">II", ihdr, 0, width, height)
    crc = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return png[:16] + bytes(ihdr) + crc + png[33:]


def png_size(png: bytes) -> tuple[int, int]:
    return struct.unpack_from(">II", png, 16)


def files_under(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def outcome(out: Path) -> dict:
    storage = open_storage(out)
    quarantine = read_parquet(storage, QUARANTINE)
    return {
        "totals": json.loads(storage.get_bytes(DATASET))["totals"],
        "index": read_parquet(storage, INDEX),
        "records": {q["record_id"]: q for q in quarantine if q["level"] == "record"},
        "quarantine": quarantine,
        "samples": read_samples(out),
    }


def check_case(result: dict, record_id: str, reason: str, words: tuple[str, ...]) -> None:
    """The record is quarantined for `reason`, its message names the problem, and nothing of it was written."""
    row = result["records"].get(record_id)
    assert row is not None, f"record {record_id} is not in the quarantine: {sorted(result['records'])}"
    assert row["reason"] == reason, row
    assert row["source_file"], row
    for word in words:
        assert word in row["message"], (word, row["message"])
    written = {r["key"] for r in result["index"]} | set(result["samples"])
    assert not any(k.endswith(f"-{int(record_id):012d}") for k in written), (record_id, sorted(written))


def check_nothing_lost(result: dict, good: list[int], bad: int) -> None:
    totals = result["totals"]
    assert totals["records_read"] == len(good) + bad
    assert totals["samples"] == len(good) and totals["quarantined"] == bad
    assert totals["records_read"] == totals["samples"] + totals["quarantined"]
    assert len(result["records"]) == bad  # one row per bad record, no other record-level row
    keys = sorted(r["key"] for r in result["index"])
    assert [int(k.rsplit("-", 1)[1]) for k in keys] == good
    assert sorted(result["samples"]) == keys  # every indexed record is in a shard, with its image
    for sample, members in result["samples"].values():
        assert members[sample.record.image.ext] and sample.record.segments


# ---- COCO instances (polygon JSON + PNG images in a folder) ----------------------------------------

INSTANCES_GOOD = [1, 2, 3]
INSTANCES_MAX_PIXELS = 2_000_000  # above the real 640x480 sample, below the bomb's 4000x4000
# record id -> (reason, words its message must hold)
INSTANCES_CASES = {
    "4": ("unsupported_format", ("0 bytes", "neither JPEG")),  # zero-byte image
    "5": ("unsupported_format", ("neither JPEG", "3C 68 74 6D")),  # an HTML error page saved as .jpg
    "6": ("truncated_image", ("IEND", "truncated")),  # the real PNG cut in half
    "7": ("decompression_bomb", ("4000x4000", "16,000,000", "2,000,000", "before decoding")),
    "8": ("unsafe_path", ()),  # an absolute file name pointing at a real image outside --images
    "9": ("unsafe_path", ("not valid UTF-8",)),  # a non-UTF-8 name (lone surrogate through a JSON escape)
    "10": ("file_too_large", ("2,000,000,000 bytes", "refused before reading")),  # a sparse 2 GB "image"
}
DECLARED = 2_000_000_000  # what the oversized files declare (sparse on disk, or a zip directory entry)


@pytest.fixture(scope="module")
def hostile_instances(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-instances")
    paths = build_instances(CORPORA, root / "coco", len(INSTANCES_GOOD))
    images = paths["images"]
    doc = load_json(paths["annotations"])
    png = (images / "000000000001.png").read_bytes()
    template = [a for a in doc["annotations"] if a["image_id"] == 1]
    next_ann = max(a["id"] for a in doc["annotations"]) + 1

    def add(image_id: int, file_name: str, data: bytes | None) -> None:
        nonlocal next_ann
        if data is not None:
            (images / file_name).write_bytes(data)
        doc["images"].append({**doc["images"][0], "id": image_id, "file_name": file_name})
        for ann in template:
            doc["annotations"].append({**ann, "image_id": image_id, "id": next_ann})
            next_ann += 1

    add(4, "000000000004.png", b"")
    add(5, "000000000005.jpg", b"<html><body>404 Not Found</body></html>\n")
    add(6, "000000000006.png", png[: len(png) // 2])
    add(7, "000000000007.png", with_ihdr_size(png, 4000, 4000))
    outside = root / "outside.png"
    outside.write_bytes(png)
    add(8, str(outside), None)
    add(9, "\udcff.png", None)  # a byte name os.fsdecode'd (b"\\xff.png"): written to JSON as an escape
    add(10, "000000000010.png", png)
    os.truncate(images / "000000000010.png", DECLARED)  # sparse: declares 2 GB, takes no disk
    paths["annotations"].write_text(json.dumps(doc))

    decoded: list[tuple[int, int]] = []
    import dataprep.imagecheck as imagecheck

    real_decode = imagecheck._decode

    def spy(data, info, max_pixels):
        decoded.append((info.width, info.height))
        return real_decode(data, info, max_pixels)

    before = files_under(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(imagecheck, "_decode", spy)
        out = convert_local("coco-instances", root / "out", paths,
                            ConvertParams(verify="full", max_pixels=INSTANCES_MAX_PIXELS))
    return {"result": outcome(out), "decoded": decoded, "png": png, "root": root, "before": before,
            "outside": outside}


@pytest.mark.parametrize("record_id", sorted(INSTANCES_CASES))
def test_instances_case_quarantined(hostile_instances, record_id):
    reason, words = INSTANCES_CASES[record_id]
    check_case(hostile_instances["result"], record_id, reason, words)


def test_instances_absolute_name_is_named_and_not_read(hostile_instances):
    row = hostile_instances["result"]["records"]["8"]
    assert str(hostile_instances["outside"]) in row["message"]
    assert "absolute" in row["message"] or ".." in row["message"]


def test_instances_good_records_all_converted(hostile_instances):
    check_nothing_lost(hostile_instances["result"], INSTANCES_GOOD, len(INSTANCES_CASES))
    samples = hostile_instances["result"]["samples"]
    for sample, members in samples.values():
        assert members["png"] == hostile_instances["png"]  # the original bytes, untouched


def test_instances_bomb_is_never_decoded(hostile_instances):
    real = png_size(hostile_instances["png"])
    decoded = hostile_instances["decoded"]
    # `--verify full` decoded every good image, so the spy sees decodes ...
    assert decoded.count(real) == len(INSTANCES_GOOD), decoded
    # ... and never the bomb: it was refused from its header
    assert (4000, 4000) not in decoded


def test_instances_writes_only_under_out(hostile_instances):
    root = hostile_instances["root"]
    new = files_under(root) - hostile_instances["before"]
    assert new and all(p == "out" or p.startswith("out/") for p in new), sorted(new)


# ---- COCO panoptic (JSON + PNG masks), images as a zip and masks as a tar --------------------------

PANOPTIC_GOOD = [1, 2, 3]
PANOPTIC_CASES = {
    "4": ("unsafe_path", ("..",)),  # zip member ../evil.jpg, named so by the annotations
    "5": ("unsafe_path", ()),  # zip member with an absolute name
    "6": ("unsafe_path", ("link",)),  # zip member that is a symlink to /etc/passwd
    "7": ("unsafe_path", ("link",)),  # tar mask member that is a hard link
    "8": ("unsafe_path", ("link",)),  # tar mask member that is a symlink
    "9": ("unsafe_path", ("..",)),  # tar mask member ../000000000009.png
    "10": ("unsupported_format", ("mask is a JPEG", "masks must be PNG")),  # the real JPEG saved as the mask
    "11": ("file_too_large", ("2,000,000,000 bytes", "member")),  # zip member whose directory declares 2 GB
}


def zip_declare_size(path: Path, member: str, size: int) -> None:
    """Make the zip's central directory declare `size` uncompressed bytes for `member` (the data stays)."""
    data = bytearray(path.read_bytes())
    at = data.find(b"PK\x01\x02")
    while at >= 0:
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, at + 28)
        if data[at + 46 : at + 46 + name_len] == member.encode():
            struct.pack_into("<I", data, at + 24, size)
            path.write_bytes(bytes(data))
            return
        at = data.find(b"PK\x01\x02", at + 46 + name_len + extra_len + comment_len)
    raise AssertionError(f"{member} not in the central directory of {path}")


@pytest.fixture(scope="module")
def hostile_panoptic(tmp_path_factory):
    n = len(PANOPTIC_GOOD) + len(PANOPTIC_CASES)
    root = tmp_path_factory.mktemp("hostile-panoptic")
    paths = build_panoptic(CORPORA, root / "coco", n)
    doc = load_json(paths["annotations"])
    img = {i["id"]: i for i in doc["images"]}
    ann = {a["image_id"]: a for a in doc["annotations"]}
    jpg = (paths["images"] / "000000000001.jpg").read_bytes()
    mask = (paths["masks"] / "000000000001.png").read_bytes()
    img[4]["file_name"] = "../evil.jpg"
    img[5]["file_name"] = "/abs5.jpg"
    ann[9]["file_name"] = "../000000000009.png"
    # a second panoptic annotation of image 1: kept out, counted (record id "1" is good, so it is checked apart)
    doc["annotations"].append({**ann[1]})
    paths["annotations"].write_text(json.dumps(doc))

    images_zip = root / "val2017.zip"
    with zipfile.ZipFile(images_zip, "w") as zf:
        for i in range(1, n + 1):
            if i not in (4, 5, 6):
                zf.writestr(f"val2017/{i:012d}.jpg", jpg)
        zf.writestr("../evil.jpg", jpg)
        zf.writestr("/abs5.jpg", jpg)
        link = zipfile.ZipInfo("val2017/000000000006.jpg")
        link.external_attr = 0o120777 << 16  # unix symlink: the data is the target
        zf.writestr(link, "/etc/passwd")
    zip_declare_size(images_zip, "val2017/000000000011.jpg", DECLARED)
    masks_tar = root / "panoptic_val2017.tar"
    with tarfile.open(masks_tar, "w") as tf:
        for i in range(1, n + 1):
            name = f"panoptic_val2017/{i:012d}.png"
            if i == 7:
                tar_link(tf, name, "panoptic_val2017/000000000001.png", tarfile.LNKTYPE)
            elif i == 8:
                tar_link(tf, name, "/etc/passwd", tarfile.SYMTYPE)
            elif i == 9:
                tar_add(tf, "../000000000009.png", mask)
            elif i == 10:
                tar_add(tf, name, jpg)
            else:
                tar_add(tf, name, mask)
    inputs = {"images": images_zip, "annotations": paths["annotations"], "masks": masks_tar}
    before = files_under(root)
    out = convert_local("coco-panoptic", root / "out", inputs)
    return {"result": outcome(out), "root": root, "before": before, "jpg": jpg}


@pytest.mark.parametrize("record_id", sorted(PANOPTIC_CASES, key=int))
def test_panoptic_case_quarantined(hostile_panoptic, record_id):
    reason, words = PANOPTIC_CASES[record_id]
    check_case(hostile_panoptic["result"], record_id, reason, words)


@pytest.mark.parametrize("record_id", ["7", "8", "9", "10"])
def test_a_bad_mask_is_blamed_not_the_image(hostile_panoptic, record_id):
    """The quarantine row names the panoptic PNG that was wrong (its tar member), not the record's good JPEG."""
    row = hostile_panoptic["result"]["records"][record_id]
    assert row["source_file"].endswith(".png") and f"{int(record_id):012d}" in row["source_file"], row
    assert row["message"].startswith(f"panoptic PNG {row['source_file']}: "), row


def test_panoptic_duplicate_annotation_quarantined(hostile_panoptic):
    rows = [q for q in hostile_panoptic["result"]["quarantine"] if q["reason"] == "duplicate_id"]
    assert [(q["level"], q["record_id"]) for q in rows] == [("record", "1")]
    assert "second panoptic annotation of image 1" in rows[0]["message"]


def test_panoptic_good_records_all_converted(hostile_panoptic):
    result = hostile_panoptic["result"]
    totals = result["totals"]
    # every image entry, plus the duplicate annotation, is read once
    assert totals["records_read"] == len(PANOPTIC_GOOD) + len(PANOPTIC_CASES) + 1
    assert totals["records_read"] == totals["samples"] + totals["quarantined"]
    assert totals["samples"] == len(PANOPTIC_GOOD) and totals["quarantined"] == len(PANOPTIC_CASES) + 1
    assert totals["quarantined_parts"] == 0
    keys = sorted(r["key"] for r in result["index"])
    assert [int(k.rsplit("-", 1)[1]) for k in keys] == PANOPTIC_GOOD
    assert sorted(result["samples"]) == keys
    for sample, members in result["samples"].values():
        assert members["jpg"] == hostile_panoptic["jpg"] and len(sample.record.segments) > 0


def test_panoptic_archives_write_nothing_outside_out(hostile_panoptic):
    root = hostile_panoptic["root"]
    new = files_under(root) - hostile_panoptic["before"]
    assert new and all(p == "out" or p.startswith("out/") for p in new), sorted(new)
    assert not (root.parent / "evil.jpg").exists() and not (root / "evil.jpg").exists()
    assert not Path("/abs5.jpg").exists()
    blob = b"".join(b"".join(m.values()) for _, m in hostile_panoptic["result"]["samples"].values())
    assert b"root:" not in blob  # no link was followed into /etc/passwd


# ---- whole inputs that stop the run: exit code 2, the file named, nothing written ------------------


def _panoptic_args(paths: dict, out: Path) -> list[str]:
    return ["data", "convert", "coco-panoptic", "--out", str(out), "--images", str(paths["images"]),
            "--annotations", str(paths["annotations"]), "--masks", str(paths["masks"]), "--num-workers", "1"]


REFUSED = {
    # case (see _damage): words the error must hold besides the file's path
    "binary-annotations": "not valid JSON",  # the real JPEG bytes saved as the annotation file
    "latin1-annotations": "not valid JSON",  # a Latin-1 (not UTF-8) document
    "text-annotations": "not valid JSON",  # a plain text file
    "list-annotations": "lacks top-level keys",  # valid JSON, but a list, not a COCO document
    "fake-zip-images": "",  # --images is a text file named val2017.zip
    "deep-annotations": "nests JSON deeper",  # JSON nested 10^5 deep: refused, not a RecursionError
    "huge-annotations": "XSAM_MAX_ANNOTATION_BYTES",  # declares 2 GB (sparse): refused unread, says how to allow it
}


def _damage(name: str, paths: dict, root: Path) -> Path:
    ann = paths["annotations"]
    if name == "binary-annotations":
        ann.write_bytes((paths["images"] / "000000000001.jpg").read_bytes())
    elif name == "latin1-annotations":
        doc = load_json(ann)
        doc["images"][0]["file_name"] = "caf\u00e9.jpg"
        ann.write_bytes(json.dumps(doc, ensure_ascii=False).encode("latin-1"))
    elif name == "text-annotations":
        ann.write_text("images: 000000000001.jpg\n")
    elif name == "list-annotations":
        ann.write_text(json.dumps([load_json(ann)]))
    elif name == "deep-annotations":
        ann.write_text("[" * 100_000 + "]" * 100_000)
    elif name == "huge-annotations":
        os.truncate(ann, DECLARED)
    elif name == "fake-zip-images":
        fake = root / "val2017.zip"
        fake.write_text("this is not a zip archive\n")
        paths["images"] = fake
        return fake
    return ann


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_inputs_stop_the_run(tmp_path, name):
    paths = build_panoptic(CORPORA, tmp_path / "coco", 2)
    named = _damage(name, paths, tmp_path)
    out = tmp_path / "out"
    proc = invoke_cli(*_panoptic_args(paths, out), check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert "error:" in text and str(named) in "".join(text.split()), text
    assert REFUSED[name] in text
    assert "Traceback" not in text
    assert not out.exists() or not any(out.rglob("*")), sorted(files_under(out))


def test_the_annotation_limit_can_be_raised_and_is_checked(tmp_path, monkeypatch):
    """XSAM_MAX_ANNOTATION_BYTES moves the limit both ways; a value that is not a size is refused."""
    from dataprep.converters.base import load_json_input
    from dataprep.quarantine import InputError
    from dataprep.sources import DEFAULT_MAX_ANNOTATION_BYTES, max_annotation_bytes

    paths = build_panoptic(CORPORA, tmp_path / "coco", 1)
    ann = paths["annotations"]
    size = ann.stat().st_size
    assert max_annotation_bytes() == DEFAULT_MAX_ANNOTATION_BYTES > DECLARED / 2
    monkeypatch.setenv("XSAM_MAX_ANNOTATION_BYTES", str(size - 1))
    with pytest.raises(InputError, match=f"{size:,} bytes, more than the {size - 1:,}-byte limit"):
        load_json_input(ann, "annotations", "fix")
    monkeypatch.setenv("XSAM_MAX_ANNOTATION_BYTES", str(size))
    data, source = load_json_input(ann, "annotations", "fix")
    assert data == load_json(ann) and source.name == ann.name
    monkeypatch.setenv("XSAM_MAX_ANNOTATION_BYTES", "2GB")
    with pytest.raises(InputError, match="XSAM_MAX_ANNOTATION_BYTES='2GB' is not a positive number of bytes"):
        load_json_input(ann, "annotations", "fix")
