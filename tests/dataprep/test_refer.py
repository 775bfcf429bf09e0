"""RefCOCO / RefCOCO+ / gRefCOCO converters end to end on the DERIVED examples of
`dataprep.examples.refer` (real COCO images and annotations, hand-written expressions).

Checked: the restricted unpickler (a callable is refused and nothing runs; latin-1 str), one record
per (image, split) with every referred object, masks pixel-exact against pycocotools' `annToMask`,
the rendered training (one turn per object) and evaluation (one per sentence) items, gRefCOCO's
multi-target and no-target expressions, keys (`refcocop` for RefCOCO+), quarantine, byte-identity
of a second conversion and lint.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import pickletools
from pathlib import Path

import numpy as np
import pytest
from builders import dataset_files
from builders import read_records as read_samples
from pycocotools.coco import COCO

from dataprep.convert import ConvertParams
from dataprep.converters import get_converter
from dataprep.examples.refer import Py2Pickler, build, py2_pickle
from dataprep.lint import lint_dataset
from xsam.data.manifest import QUARANTINE, read_parquet
from dataprep.quarantine import InputError
from dataprep.safe_pickle import load_data_pickle, loads_data_pickle
from xsam.data.storage import open_storage
from jobs.convert import run_conversion
from xsam.data import masks
from xsam.data.schema import SEG_TOKEN


def convert(corpus: str, out: Path, inputs: dict[str, str]) -> dict:
    return run_conversion(corpus, str(out), inputs, ConvertParams(), num_workers=1).meta


@pytest.fixture(scope="module")
def examples(corpora, tmp_path_factory) -> dict[str, dict[str, str]]:
    return build(corpora, tmp_path_factory.mktemp("refer") / "examples")


@pytest.fixture(scope="module")
def refcoco(examples, ray_session, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("refcoco") / "out"
    return out, convert("refcoco", out, examples["refcoco"])


@pytest.fixture(scope="module")
def grefcoco(examples, ray_session, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("grefcoco") / "out"
    return out, convert("grefcoco", out, examples["grefcoco"])


def reference_masks(instances: str) -> dict[int, np.ndarray]:
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(instances)
    return {ann_id: coco.annToMask(ann).astype(bool) for ann_id, ann in coco.anns.items()}


# ---- the restricted unpickler ------------------------------------------------------------------


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_unpickler_refuses_callable_and_runs_nothing(tmp_path, protocol):
    marker = tmp_path / "executed"
    data = pickle.dumps([{"ref_id": 1, "x": _Evil(marker)}], protocol=protocol)  # writing, not loading
    path = tmp_path / "refs(unc).p"
    path.write_bytes(data)
    with pytest.raises(InputError) as err:
        load_data_pickle(path)
    assert "refs(unc).p" in str(err.value) and "system" in str(err.value)  # names the file and the global
    assert not marker.exists()


def test_unpickler_refuses_non_data(tmp_path):
    with pytest.raises(InputError, match="bytes"):
        loads_data_pickle(pickle.dumps([b"raw"], protocol=3), name="refs(unc).p")
    with pytest.raises(InputError, match="not a readable data pickle"):
        loads_data_pickle(b"\x80\x02]q\x00(K\x01", name="refs(unc).p")  # truncated


def test_py2_pickle_is_protocol_2_latin1(examples):
    data = Path(examples["refcoco"]["refs"]).read_bytes()
    ops = {op.name for op, _, _ in pickletools.genops(data)}
    assert data[:2] == b"\x80\x02" and "SHORT_BINSTRING" in ops
    assert not ops & {"BINUNICODE", "SHORT_BINUNICODE", "GLOBAL", "STACK_GLOBAL", "REDUCE"}
    assert "caf\xe9".encode("latin-1") in data  # a Python 2 byte string, latin-1
    refs, _ = load_data_pickle(examples["refcoco"]["refs"])
    assert refs[1]["sentences"][2]["sent"] == "café colored cat on the right"
    # the emitter: long strings become BINSTRING, more than 256 memo entries LONG_BINPUT/LONG_BINGET
    obj = [f"s{i}" for i in range(300)] + ["x" * 300, "s299", -5, 2**40, 1.5, True, None, (1, "a")]
    p = Py2Pickler()
    p.dump(obj)
    assert loads_data_pickle(p.finish(), name="t.p") == obj[:-1] + [(1, "a")]
    assert {"BINSTRING", "LONG_BINPUT", "LONG_BINGET"} <= {op.name for op, _, _ in pickletools.genops(py2_pickle(obj))}


# ---- RefCOCO -------------------------------------------------------------------------------------


def test_refcoco_records(refcoco, examples):
    out, meta = refcoco
    totals = meta["totals"]
    assert totals["records_read"] == totals["samples"] + totals["quarantined"] == 4
    assert meta["parameters"]["partition"] == "unc" and meta["splits"] == ["testA", "testB", "train", "val"]
    samples = read_samples(out)
    assert sorted(samples) == [
        "refcoco-testa-000000439180", "refcoco-testb-000000439180",
        "refcoco-train-000000039769", "refcoco-val-000000039769",
    ]
    refs, _ = load_data_pickle(examples["refcoco"]["refs"])
    ref_masks = reference_masks(examples["refcoco"]["instances"])
    for key, sample in samples.items():
        record = sample.record
        split = record.source.split
        assert key.split("-")[1] == split.lower() and split in {"train", "val", "testA", "testB"}
        assert record.source.annotation_file == "refs(unc).p" and record.task == "refseg"
        mine = [r for r in refs if r["split"] == split and r["image_id"] == record.source.upstream_ids["image_id"]]
        assert [s.id for s in record.segments] == sorted(r["ann_id"] for r in mine)
        for seg in record.segments:  # pixel-exact against pycocotools annToMask
            assert np.array_equal(masks.decode(seg.rle), ref_masks[seg.id]), (key, seg.id)
        # every sentence of every ref, upstream order, and what it refers to
        want = [(s["sent"], r["ann_id"], s["sent_id"]) for r in mine for s in r["sentences"]]
        ids = [s.id for s in record.segments]
        got = [(p, ids[t[0]], sid) for p, t, sid in zip(record.phrases, record.meta["phrase_segments"], record.meta["sent_ids"])]
        assert got == want and all(len(t) == 1 for t in record.meta["phrase_segments"])


def test_refcoco_items(refcoco):
    out, _ = refcoco
    samples = read_samples(out)
    train = samples["refcoco-train-000000039769"]
    assert "café colored cat on the right" in train.record.phrases
    (item,) = train.items
    assert item.mode == "train" and len(item.turns) == 2 * len(train.record.segments) == 4  # one turn per object
    assert [t.text.count(SEG_TOKEN) for t in item.turns] == [0, 1, 0, 1]
    phrase_segments = train.record.meta["phrase_segments"]
    targeted = []
    for k, seg in enumerate(item.segs):
        (target,) = seg.targets
        assert target.span == k and [target.segment] == phrase_segments[item.spans[k].phrase_index]
        targeted.append(target.segment)
    assert sorted(targeted) == [0, 1]
    for key in ("refcoco-val-000000039769", "refcoco-testa-000000439180"):
        sample = read_samples(out)[key]
        assert len(sample.items) == len(sample.record.phrases)  # one evaluation item per sentence
        for p, it in enumerate(sample.items):
            assert it.mode == "eval" and len(it.turns) == 2 and it.spans[0].phrase_index == p
            assert it.template_ids == ["refseg.q0", "refseg.a0"]
            assert [t.segment for t in it.segs[0].targets] == sample.record.meta["phrase_segments"][p]


def test_refcoco_reproducible_and_lints(refcoco, examples, corpora, tmp_path):
    out, _ = refcoco
    assert lint_dataset(open_storage(out)).ok
    build(corpora, tmp_path / "ex")  # the builder twice: byte-identical inputs
    assert dataset_files(tmp_path / "ex") == dataset_files(Path(examples["refcoco"]["images"]).parent)
    out2 = tmp_path / "out2"
    convert("refcoco", out2, examples["refcoco"])
    assert dataset_files(out2) == dataset_files(out)


def test_refcocop_key_and_partition(examples):
    conv = get_converter("refcoco+")(**examples["refcoco+"])
    plan = conv.plan()
    assert plan.records and all(r.key.startswith("refcocop-") for r in plan.records)
    assert conv.parameters()["partition"] == "unc"
    assert get_converter("refcocog")(**{**examples["refcocog"]}).parameters()["partition"] == "umd"
    with pytest.raises(InputError, match="partition"):
        get_converter("refcoco")(refs="refs.p", instances="i.json", images=".").parameters()


# ---- gRefCOCO ------------------------------------------------------------------------------------


def test_grefcoco_targets(grefcoco, examples):
    out, meta = grefcoco
    assert meta["totals"]["records_read"] == meta["totals"]["samples"] == 2
    samples = read_samples(out)
    val = samples["grefcoco-val-000000039769"]
    record = val.record
    ref_masks = reference_masks(examples["grefcoco"]["instances"])
    assert [s.id for s in record.segments] == [1110067, 2190839, 2190842]
    for seg in record.segments:
        assert np.array_equal(masks.decode(seg.rle), ref_masks[seg.id])
    both = record.phrases.index("both cats")
    none = record.phrases.index("the dog on the couch")
    assert record.meta["phrase_segments"][both] == [1, 2] and record.meta["phrase_segments"][none] == []
    assert len(val.items) == len(record.phrases) == 4
    no_item, multi_item = val.items[none], val.items[both]
    assert no_item.segs[0].targets == [] and no_item.template_ids[1].startswith("refseg.grefseg_no_target")
    assert no_item.turns[1].text.count(SEG_TOKEN) == 1
    assert sorted(t.segment for t in multi_item.segs[0].targets) == [1, 2]
    assert {t.span for t in multi_item.segs[0].targets} == {0}
    # training: one turn per target set, the no-target group included
    (item,) = samples["grefcoco-train-000000439180"].items
    assert len(item.segs) == 3 and sorted(len(s.targets) for s in item.segs) == [0, 1, 2]


def test_grefcoco_pickled_variant(examples, tmp_path):
    refs = json.loads(Path(examples["grefcoco"]["refs"]).read_bytes())
    path = tmp_path / "refs(unc).p"  # X-SAM's name for its pickled copy (grefcoco/refs(unc).p)
    path.write_bytes(py2_pickle(refs))
    inputs = {**examples["grefcoco"], "refs": str(path)}
    plan = get_converter("grefcoco")(**inputs).plan()
    json_plan = get_converter("grefcoco")(**examples["grefcoco"]).plan()
    assert [r.payload for r in plan.records] == [r.payload for r in json_plan.records]


def test_grefcoco_real_release_quirks(examples, ray_session, tmp_path):
    """What the real gRefCOCO release holds beside the usual: a no-target ref exactly as one is
    printed from grefs(unc).json (ref 135, henghuiding/gRefCOCO issue #12, its image and sentence
    moved onto our example), refs without sentences (issues #3, #8: "skip them"), and an annotation
    whose segmentation is a list of RLE pieces (its reference loader sums the pieces)."""
    src = examples["grefcoco"]
    refs = json.loads(Path(src["refs"]).read_bytes())
    inst = json.loads(Path(src["instances"]).read_bytes())
    val = [r for r in refs if r["split"] == "val"]
    image_id = val[0]["image_id"]
    real = {"ann_id": [-1], "category_id": [-1], "file_name": f"COCO_train2014_{image_id:012d}.jpg",
            "image_id": image_id, "no_target": True, "ref_id": 135, "sent_ids": [400],
            "sentences": [{"raw": "the b;ack keyboard in front of the computer on the table",
                           "sent": "the b;ack keyboard in front of the computer on the table", "sent_id": 400,
                           "tokens": ["the", "b;ack", "keyboard", "in", "front", "of", "the", "computer", "on",
                                      "the", "table"]}], "split": "val"}
    refs.append(real)
    refs.append({**val[0], "ref_id": 136, "sent_ids": [], "sentences": []})
    # split one target annotation's mask into two RLE pieces (left and right half of its pixels)
    target = next(a for a in val[0]["ann_id"] if a != -1)
    ann = next(a for a in inst["annotations"] if a["id"] == target)
    whole = reference_masks(src["instances"])[target]
    cols = np.flatnonzero(whole.any(axis=0))
    middle = int(cols[len(cols) // 2])
    left, right = whole.copy(), whole.copy()
    left[:, middle:] = False
    right[:, :middle] = False
    assert left.any() and right.any()
    ann["segmentation"] = [masks.to_coco(masks.encode(left)), masks.to_coco(masks.encode(right))]
    for piece in ann["segmentation"]:
        piece["counts"] = piece["counts"].decode("ascii") if isinstance(piece["counts"], bytes) else piece["counts"]
    d = tmp_path / "in"
    d.mkdir()
    (d / "grefs(unc).json").write_text(json.dumps(refs))
    (d / "instances.json").write_text(json.dumps(inst))
    out = tmp_path / "out"
    meta = convert("grefcoco", out, {**src, "refs": str(d / "grefs(unc).json"), "instances": str(d / "instances.json")})
    totals = meta["totals"]
    assert totals["records_read"] == totals["samples"] + totals["quarantined"] and totals["quarantined"] == 0
    rows = read_parquet(open_storage(out), QUARANTINE)
    assert [(r["level"], r["reason"], r["part_id"]) for r in rows] == [("part", "upstream_filter", "ref:136")]
    record = read_samples(out)[f"grefcoco-val-{image_id:012d}"].record
    i = record.phrases.index("the b;ack keyboard in front of the computer on the table")
    assert record.meta["phrase_segments"][i] == [] and record.meta["ref_ids"][i] == 135
    (seg,) = [s for s in record.segments if s.id == target]
    assert np.array_equal(masks.decode(seg.rle), whole)  # the union of the pieces, pixel-exact
    assert lint_dataset(open_storage(out)).ok


# ---- quarantine ------------------------------------------------------------------------------------


def test_quarantine(examples, ray_session, tmp_path):
    src = examples["refcoco"]
    refs, _ = load_data_pickle(src["refs"])
    inst = json.loads(Path(src["instances"]).read_bytes())
    # 1. a ref naming an annotation that instances.json lacks -> part orphan_annotation
    refs.append({**refs[0], "ref_id": 100, "ann_id": 999999999})
    # 2. every ref of (image 39769, testB) points at an image... that exists, but its only ref is
    #    an empty ref (no sentences, as gRefCOCO releases some) -> record-level upstream_filter
    refs.append({**refs[0], "ref_id": 101, "split": "testB", "sentences": []})
    # 3. refs on an image missing from instances.json -> record-level orphan_annotation
    refs.append({**refs[0], "ref_id": 102, "image_id": 123456})
    # 4. a degenerate polygon (2 points) on the val remote 1108446 -> its expressions dropped (parts)
    for ann in inst["annotations"]:
        if ann["id"] == 1108446:
            ann["segmentation"] = [[10.0, 10.0, 20.0, 20.0]]
    # 5. a sentence holding a reserved string -> part invalid_annotation
    refs[0]["sentences"].append({"sent_id": 500, "sent": "the <SEG> cat", "raw": "the <SEG> cat", "tokens": []})
    d = tmp_path / "bad"
    d.mkdir()
    (d / "refs(unc).p").write_bytes(py2_pickle(refs))
    (d / "instances.json").write_text(json.dumps(inst))
    out = tmp_path / "out"
    meta = convert("refcoco", out, {**src, "refs": str(d / "refs(unc).p"), "instances": str(d / "instances.json")})
    totals = meta["totals"]
    assert totals["records_read"] == totals["samples"] + totals["quarantined"] == 6
    assert totals["quarantined"] == 2
    rows = read_parquet(open_storage(out), QUARANTINE)
    got = sorted((r["level"], r["key"], r["reason"], r["part_id"]) for r in rows)
    assert got == [
        ("part", "refcoco-train-000000039769", "invalid_annotation", "sent:500"),
        ("part", "refcoco-train-000000039769", "orphan_annotation", "ref:100"),
        ("part", "refcoco-val-000000039769", "degenerate_polygon", "ann:1108446"),
        ("part", "refcoco-val-000000039769", "degenerate_polygon", "ref:3"),
        ("record", "refcoco-testb-000000039769", "upstream_filter", ""),
        ("record", "refcoco-train-000000123456", "orphan_annotation", ""),
    ]
    val = read_samples(out)["refcoco-val-000000039769"].record
    assert [s.id for s in val.segments] == [1110067] and val.phrases == ["remote on the left", "left remote"]
    assert lint_dataset(open_storage(out)).ok
