"""Small RefCOCO / RefCOCO+ / RefCOCOg / gRefCOCO inputs in the EXACT upstream layout, DERIVED
from the real COCO samples (no real REFER file can be shipped here).

Output (`build(corpora, out)`):

    images/000000039769.png, images/000000439180.jpg   real image bytes, copied
    refcoco/instances.json, refcoco/refs(unc).p        refs: a Python-2-style protocol-2 pickle
    refcoco+/instances.json, refcoco+/refs(unc).p
    refcocog/instances.json, refcocog/refs(umd).p
    grefcoco/instances.json, grefcoco/grefs(unc).json
    README.md                                          says what is derived and how

`instances.json` = COCO instances with the real annotations of image 39769 (6 polygons,
coco_instances_polygons) and the real thing annotations of image 439180 (compressed RLE, from
coco_instances/panoptic_coco_detection_format.json), image ids as upstream, the 80 thing
categories. The expressions are written here from the real categories and box positions.

The pickle is written opcode by opcode as Python 2's cPickle writes protocol 2: `str` as
SHORT_BINSTRING/BINSTRING holding latin-1 bytes (never Python 3's BINUNICODE), ints as
BININT1/BININT2/BININT, containers memoised with BINPUT, repeated strings fetched with BINGET.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

POLY_IMAGE = 39769  # 2 cats, couch, bed, 2 remotes (real polygons)
PAN_IMAGE = 439180  # people riding horses (real RLE)


# ---- a tiny Python 2 (cPickle, protocol 2) emitter --------------------------------------------


class Py2Pickler:
    """Emit protocol-2 opcodes for dict/list/tuple/str/int/float/bool/None as Python 2 would."""

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")  # PROTO 2
        self.memo: dict[str, int] = {}
        self.next_memo = 0

    def _put(self) -> None:
        i = self.next_memo
        self.next_memo += 1
        self.out += b"q" + bytes([i]) if i < 256 else b"r" + struct.pack("<I", i)  # BINPUT / LONG_BINPUT

    def _str(self, text: str) -> None:
        if text in self.memo:
            i = self.memo[text]
            self.out += b"h" + bytes([i]) if i < 256 else b"j" + struct.pack("<I", i)  # BINGET / LONG_BINGET
            return
        raw = text.encode("latin-1")  # a Python 2 byte string
        if len(raw) < 256:
            self.out += b"U" + bytes([len(raw)]) + raw  # SHORT_BINSTRING
        else:
            self.out += b"T" + struct.pack("<i", len(raw)) + raw  # BINSTRING
        self.memo[text] = self.next_memo
        self._put()

    def _int(self, v: int) -> None:
        if 0 <= v < 256:
            self.out += b"K" + bytes([v])  # BININT1
        elif 0 <= v < 65536:
            self.out += b"M" + struct.pack("<H", v)  # BININT2
        elif -(2**31) <= v < 2**31:
            self.out += b"J" + struct.pack("<i", v)  # BININT
        else:
            raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
            self.out += b"\x8a" + bytes([len(raw)]) + raw  # LONG1

    def dump(self, obj: Any) -> None:
        if obj is None:
            self.out += b"N"
        elif obj is True or obj is False:
            self.out += b"\x88" if obj else b"\x89"  # NEWTRUE / NEWFALSE
        elif isinstance(obj, int):
            self._int(obj)
        elif isinstance(obj, float):
            self.out += b"G" + struct.pack(">d", obj)  # BINFLOAT
        elif isinstance(obj, str):
            self._str(obj)
        elif isinstance(obj, list):
            self.out += b"]"  # EMPTY_LIST
            self._put()
            if obj:
                self.out += b"("  # MARK
                for v in obj:
                    self.dump(v)
                self.out += b"e"  # APPENDS
        elif isinstance(obj, dict):
            self.out += b"}"  # EMPTY_DICT
            self._put()
            if obj:
                self.out += b"("
                for k in sorted(obj):  # Python 2 writes hash order; sorted keeps the file reproducible
                    self.dump(k)
                    self.dump(obj[k])
                self.out += b"u"  # SETITEMS
        elif isinstance(obj, tuple):
            self.out += b"("
            for v in obj:
                self.dump(v)
            self.out += b"t"  # TUPLE
            self._put()
        else:
            raise TypeError(f"cannot emit {type(obj).__name__}")

    def finish(self) -> bytes:
        return bytes(self.out + b".")  # STOP


def py2_pickle(obj: Any) -> bytes:
    p = Py2Pickler()
    p.dump(obj)
    return p.finish()


# ---- derived expressions ------------------------------------------------------------------------

# (split, ann_id, [raw sentences]); written from the real categories and box geometry:
# image 39769: cat 2190839 x 17-319 (left), cat 2190842 x 347-640 (right), remote 1110067 x 42-175
# (left, lying), remote 1108446 x 333-372 (right, upright); image 439180: persons 20 (x 0-13, far
# left), 18 (x 200-253), 24 (x 577-615, far right); horses 43 (x 92-146), 41 (x 398-462, largest).
REFCOCO = [
    ("train", 2190839, ["Cat on the left", "left cat", "the cat lying on the left"]),
    ("train", 2190842, ["cat on the right", "right kitty", "Café colored cat on the right"]),
    ("val", 1110067, ["remote on the left", "left remote"]),
    ("val", 1108446, ["remote on the right", "upright remote"]),
    ("testA", 20, ["person at the far left edge"]),
    ("testA", 18, ["person left of center", "guy in the middle left"]),
    ("testA", 24, ["rightmost person"]),
    ("testB", 43, ["horse on the left"]),
    ("testB", 41, ["big horse right of center"]),
]
REFCOCO_PLUS = [  # RefCOCO+: no location words
    ("train", 2190839, ["striped cat with its head down"]),
    ("train", 2190842, ["cat with its head up"]),
    ("val", 1110067, ["remote lying flat"]),
    ("testA", 18, ["person riding a dark horse"]),
    ("testB", 41, ["largest horse"]),
]
REFCOCOG = [  # RefCOCOg (umd): longer sentences; splits train / val / test
    ("train", 2190839, ["a tabby cat sleeping on a pink blanket next to a remote"]),
    ("val", 1108446, ["a white remote control standing upright near the cat on the right"]),
    ("test", 41, ["the largest horse in the group being ridden across the field"]),
]
# gRefCOCO: (split, ann_ids (-1 = no target), [raw sentences])
GREFCOCO = [
    ("val", [2190839, 2190842], ["both cats", "two cats lying on the blanket"]),
    ("val", [-1], ["the dog on the couch"]),
    ("val", [1110067], ["left remote"]),
    ("train", [20, 30], ["two people at the left edge"]),
    ("train", [-1], ["the zebra"]),
    ("train", [43], ["horse on the left"]),
]


def _sentences(raws: list[str], first_id: int) -> list[dict[str, Any]]:
    out = []
    for j, raw in enumerate(raws):
        sent = raw.lower()
        out.append({"sent_id": first_id + j, "raw": raw, "sent": sent, "tokens": sent.split()})
    return out


def _refs(table: list[tuple[str, Any, list[str]]], anns: dict[int, dict[str, Any]], images: dict[int, dict[str, Any]],
          *, generalized: bool) -> list[dict[str, Any]]:
    refs, sent_id = [], 0
    for ref_id, (split, ann, raws) in enumerate(table):
        ids = ann if isinstance(ann, list) else [ann]
        real = [a for a in ids if a != -1]
        image_id = anns[real[0]]["image_id"] if real else POLY_IMAGE if split == "val" else PAN_IMAGE
        stem, ext = images[image_id]["file_name"].rsplit(".", 1)
        sentences = _sentences(raws, sent_id)
        sent_id += len(raws)
        ref: dict[str, Any] = {
            "ref_id": ref_id,
            "image_id": image_id,
            "split": split,
            "sent_ids": [s["sent_id"] for s in sentences],
            "sentences": sentences,
        }
        if generalized:
            ref["ann_id"] = ids
            ref["category_id"] = [anns[a]["category_id"] for a in real] if real else [-1]
            ref["no_target"] = not real
            # as in the release: no suffix on a no-target ref, one number on the others
            ref["file_name"] = f"{stem}_{real[0]}.{ext}" if real else f"{stem}.{ext}"
        else:
            ref["ann_id"] = ann
            ref["category_id"] = anns[ann]["category_id"]
            ref["file_name"] = f"{stem}_{ann}.{ext}"
        refs.append(ref)
    return refs


def instances_doc(corpora: Path) -> dict[str, Any]:
    poly = json.loads((corpora / "coco_instances_polygons" / "annotations" / "instances_val2017.json").read_bytes())
    det = json.loads((corpora / "coco_instances" / "annotations" / "panoptic_coco_detection_format.json").read_bytes())
    things = {c["id"] for c in poly["categories"]}
    (pan_image,) = [i for i in det["images"] if i["id"] == PAN_IMAGE]
    keep = ("segmentation", "area", "iscrowd", "image_id", "bbox", "category_id", "id")
    pan_anns = [{k: a[k] for k in keep} for a in det["annotations"] if a["category_id"] in things]
    return {
        "info": {"description": "DERIVED example for REFER-style corpora: real COCO annotations of images 39769 and 439180"},
        "images": poly["images"] + [pan_image],
        "annotations": poly["annotations"] + pan_anns,
        "categories": poly["categories"],
    }


README = """# REFER-style example inputs (DERIVED, not upstream files)

Built by `dataprep/examples/refer.py` from the real COCO samples of this repository; nothing here is
a real RefCOCO/RefCOCO+/RefCOCOg/gRefCOCO file.

- `images/000000039769.png`: real COCO val2017 image 39769 (coco_instances_polygons), bytes copied.
- `images/000000439180.jpg`: real COCO val2017 image 439180 (coco_panoptic / coco_instances), bytes copied.
- `*/instances.json`: COCO instances layout (`info`, `images`, `annotations`, `categories`) holding the
  6 real polygon annotations of image 39769 (verbatim) and the real thing annotations of image 439180
  (compressed RLE as in panopticapi's detection-format JSON, crowd included), image and annotation ids as
  upstream, the 80 COCO thing categories. (Upstream REFER instances.json files hold COCO train2014
  polygons; these are val2017 images, so file names are the val2017 ones.)
- `refcoco/refs(unc).p`, `refcoco+/refs(unc).p`, `refcocog/refs(umd).p`: REFER refs lists
  `{ref_id, ann_id, image_id, category_id, split, file_name, sent_ids, sentences[{sent_id, sent, raw,
  tokens}]}` written as a Python 2 protocol-2 pickle (str = SHORT_BINSTRING latin-1 bytes). The
  EXPRESSIONS WERE WRITTEN BY HAND from the real category names and box positions (e.g. "cat on the
  left" for the cat whose box spans x 17-319 of 640); `sent` is the lower-cased `raw`. Splits were
  assigned by hand (train/val/testA/testB; image 39769 appears in train and val, which upstream
  never does, to exercise one record per (image, split)).
- `grefcoco/grefs(unc).json`: gRefCOCO refs (`ann_id` a list; `[-1]` with `no_target: true` for an
  expression that refers to nothing), with multi-target ("both cats") and no-target ("the dog on the
  couch") expressions, written the same way.
"""


def build(corpora: Path, out: Path) -> dict[str, dict[str, str]]:
    out = Path(out)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(corpora / "coco_instances_polygons" / "val2017" / f"{POLY_IMAGE:012d}.png", images_dir / f"{POLY_IMAGE:012d}.png")
    shutil.copyfile(corpora / "coco_panoptic" / "val2017" / f"{PAN_IMAGE:012d}.jpg", images_dir / f"{PAN_IMAGE:012d}.jpg")
    doc = instances_doc(corpora)
    instances = json.dumps(doc).encode()
    anns = {a["id"]: a for a in doc["annotations"]}
    images = {i["id"]: i for i in doc["images"]}

    result: dict[str, dict[str, str]] = {}
    for corpus, folder, refs_name, table in (
        ("refcoco", "refcoco", "refs(unc).p", REFCOCO),
        ("refcoco+", "refcoco+", "refs(unc).p", REFCOCO_PLUS),
        ("refcocog", "refcocog", "refs(umd).p", REFCOCOG),
        ("grefcoco", "grefcoco", "grefs(unc).json", GREFCOCO),
    ):
        d = out / folder
        d.mkdir(parents=True, exist_ok=True)
        (d / "instances.json").write_bytes(instances)
        generalized = corpus == "grefcoco"
        refs = _refs(table, anns, images, generalized=generalized)
        data = json.dumps(refs).encode() if refs_name.endswith(".json") else py2_pickle(refs)
        (d / refs_name).write_bytes(data)
        result[corpus] = {"refs": str(d / refs_name), "instances": str(d / "instances.json"), "images": str(images_dir)}
    (out / "README.md").write_text(README)
    return result
