"""Model-ready batches from real shards: targets, ignore, regions, text, truncation, determinism.

Every expectation is computed independently of the builder: masks with pycocotools + PIL nearest
resizing, spans and <SEG>s by scanning the token ids.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import build_instances, convert_local, read_records
from conftest import CORPORA
from PIL import Image as PILImage
from pycocotools import mask as mask_utils

from dataprep.convert import ConvertParams
from xsam.data.builder import XSamBuilder
from xsam.data.loader import StreamLoader
from xsam.data.mixture import parse_mixture
from xsam.data.render import RenderOptions
from xsam.data.transforms import PreprocessConfig
from xsam.text import build_tiny_tokenizer, load_tokenizer
from xsam.text.tokens import IGNORE_INDEX, IMAGE_TOKEN_INDEX, REGION_TOKEN_INDEX, special_ids

SMALL = PreprocessConfig(vision_size=32, seg_size=128)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("builder")
    from dataprep.examples import coco_vgd, refer

    out = {"tokenizer": build_tiny_tokenizer(root / "tok")}
    inputs = build_instances(CORPORA, root / "in-inst", 6, sample="rle", split="train2017")
    out["instances"] = convert_local("coco-instances", root / "instances", inputs, ConvertParams(shard_max_samples=4))
    vgd = coco_vgd.build(CORPORA, root / "in-vgd")["coco-vgd"]
    out["vgd"] = convert_local("coco-vgd", root / "vgd", {**vgd, "split": "train2017"}, ConvertParams())
    ref = refer.build(CORPORA, root / "in-ref")["refcoco"]
    out["refcoco"] = convert_local("refcoco", root / "refcoco", ref, ConvertParams())
    return out


def spec_for(world, names, g=2, mode="source_grouped", reps=1):
    return parse_mixture(
        {
            "seed": 9,
            "batching": {"mode": mode, "global_batch_size": g},
            "sources": [{"name": n, "path": str(world[n]), "repetitions": reps} for n in names],
        }
    )


def batches(world, names, *, builder_kw=None, loader_kw=None, **spec_kw):
    spec = spec_for(world, names, **spec_kw)
    kw = {"tokenizer": world["tokenizer"], "preprocess": SMALL, "seed": spec.seed, **(builder_kw or {})}
    builder = XSamBuilder(micro_batch_size=spec.batching.global_batch_size, **kw)
    loader = StreamLoader(spec, builder=builder, cache_dir=world["tokenizer"].parent / "cache", **(loader_kw or {}))
    packed = list(loader)
    for p in packed:  # compact on the way out of the workers: uint8 images, bit-packed masks
        assert p.images.dtype == np.uint8 and all(w is None or w.dtype == np.uint8 for w in p.seg_windows)
        assert all(m is None or m.bits.dtype == np.uint8 for m in p.masks)
    return [p.to("cpu") for p in packed], loader


def reference_mask(rle, geometry) -> np.ndarray:
    """Independent reference: pycocotools decode, PIL nearest resize, zero padding."""
    m = mask_utils.decode({"size": list(rle.size), "counts": rle.counts.encode()})
    h, w = geometry.scaled_size
    resized = np.array(PILImage.fromarray(m * 255).resize((w, h), PILImage.Resampling.NEAREST)) > 0
    out = np.zeros((geometry.seg_size, geometry.seg_size), bool)
    out[:h, :w] = resized
    return out


def spans_of(cond_ids: torch.Tensor) -> list[int]:
    return sorted({int(k) for k in cond_ids if k >= 0})


def test_genseg_targets_match_the_record(world):
    records = read_records(world["instances"])
    tok = load_tokenizer(world["tokenizer"])
    ids = special_ids(tok)
    got, _ = batches(world, ["instances"])
    vocabulary = json.loads((world["instances"] / "dataset.json").read_text())["categories"]
    assert sum(len(b) for b in got) == 6
    for batch in got:
        assert batch.pixel_values.shape == (2, 3, 32, 32) and batch.seg_pixel_values.shape == (2, 3, 128, 128)
        for b, key in enumerate(batch.keys):
            record = records[key.split("#")[0]].record
            n = int(batch.attention_mask[b].sum())
            input_ids, labels = batch.input_ids[b, :n], batch.labels[b, :n]
            assert (batch.input_ids[b, n:] == ids.pad).all() and (batch.labels[b, n:] == IGNORE_INDEX).all()
            assert int((input_ids == IMAGE_TOKEN_INDEX).sum()) == 1
            seg_positions = (input_ids == ids.seg).nonzero().flatten().tolist()
            assert batch.seg_ids[b, :n][seg_positions].tolist() == [0]
            assert labels[seg_positions[0]] == ids.seg  # the <SEG> is an answer token, supervised
            # the whole vocabulary is listed as spans, each <p> ... </p> inclusive
            spans = spans_of(batch.cond_ids[b])
            assert spans == list(range(len(vocabulary)))
            for k in (0, len(vocabulary) - 1):
                where = (batch.cond_ids[b] == k).nonzero().flatten()
                assert batch.input_ids[b, where[0]] == ids.p_start and batch.input_ids[b, where[-1]] == ids.p_end
            # every non-crowd segment is one target of the one <SEG>, classified by its category's span
            targets = [s for s in record.segments if not s.iscrowd]
            assert batch.masks[b].shape == (len(targets), 128, 128)
            assert batch.mask_segs[b].tolist() == [0] * len(targets)
            geometry = batch.geometries[b]
            for row, seg in enumerate(targets):
                assert np.array_equal(batch.masks[b][row].numpy(), reference_mask(seg.rle, geometry))
            assert batch.scaled_sizes[b].tolist() == [72, 128]  # 360x640 -> longest side 128
            assert batch.image_sizes[b].tolist() == [360, 640]


def test_refseg_multi_turn_targets_one_mask_per_turn(world):
    records = read_records(world["refcoco"])
    got, _ = batches(world, ["refcoco"], g=1)
    by_key = {batch.keys[0]: batch for batch in got}
    train = next(k for k in by_key if k.startswith("refcoco-train"))
    batch = by_key[train]
    record = records[train.split("#")[0]].record
    item = records[train.split("#")[0]].items[0]
    turns = len(item.segs)
    assert turns == 2
    assert batch.mask_segs[0].tolist() == list(range(turns))  # one <SEG> per turn, one mask each
    assert batch.mask_spans[0].tolist() == list(range(turns))  # each turn's mask is its own span's class
    assert len(spans_of(batch.cond_ids[0])) == turns
    phrase_segments = record.meta["phrase_segments"]
    # the masks are the referred objects (in the rendered turn order): each is one of the record's segments
    references = [reference_mask(s.rle, batch.geometries[0]) for s in record.segments]
    for row in range(turns):
        assert any(np.array_equal(batch.masks[0][row].numpy(), r) for r in references)
    assert all(len(p) == 1 for p in phrase_segments)
    evals = [k for k in by_key if k.startswith("refcoco-val")]
    assert len(evals) == len(records[evals[0].split("#")[0]].items) == 4  # one item per sentence


def test_vgd_regions_and_negatives_from_the_batch(world):
    got, _ = batches(world, ["vgd"], g=2, reps=8)
    records = read_records(world["vgd"])
    record = next(iter(records.values())).record
    assert len(record.visual_prompts) == 24
    categories = len({p.phrase_index for p in record.visual_prompts})
    saw_negative = False
    for batch in got:
        for b in range(len(batch)):
            n = int(batch.attention_mask[b].sum())
            regions = int((batch.input_ids[b, :n] == REGION_TOKEN_INDEX).sum())
            assert batch.regions[b].shape == (regions, 128, 128)
            own = batch.region_sources[b] == b
            assert own.sum() == categories  # one region per category present
            assert all(batch.regions[b][i].any() for i in range(regions))
            if (~own).any():  # a negative: pooled from the other sample's image, no target points at it
                saw_negative = True
                other = 1 - b
                assert set(batch.region_sources[b][~own].tolist()) == {other}
                negative_spans = set((~own).nonzero().flatten().tolist())
                assert not negative_spans & set(batch.mask_spans[b].tolist())
    assert saw_negative  # p = 0.5 per item over 8 passes


def test_no_negatives_without_a_second_sample(world):
    got, _ = batches(world, ["vgd"], g=1, reps=8)
    for batch in got:
        assert (batch.region_sources[0] == 0).all()


def test_truncation_drops_turns_and_their_masks(world):
    full, _ = batches(world, ["refcoco"], g=1)
    train = next(b for b in full if b.keys[0].startswith("refcoco-train"))
    n = int(train.attention_mask[0].sum())
    # a limit between one and two (question, answer) pairs keeps the first turn only
    first_answer_end = int((train.labels[0] != IGNORE_INDEX).nonzero().flatten()[0]) + 8
    cut, loader = batches(world, ["refcoco"], g=1, builder_kw={"max_length": min(n - 1, first_answer_end + 2)})
    assert loader.metrics()["data/truncated_items"] >= 1
    cut = next(b for b in cut if b.keys[0] == train.keys[0])
    assert cut.truncated == 1 and cut.mask_segs[0].tolist() == [0] and len(cut.masks[0]) == 1
    assert torch.equal(cut.masks[0][0], train.masks[0][0])
    # a limit below the first turn makes every item bad: the loader replaces, then gives up
    with pytest.raises(RuntimeError, match="TextTooLong"):
        batches(world, ["refcoco"], g=1, builder_kw={"max_length": 5}, loader_kw={"max_consecutive_bad": 3})


def test_batches_are_the_same_with_workers_and_lsj_is_per_item(world):
    kw = {"preprocess": PreprocessConfig(vision_size=32, seg_size=128, lsj=True)}
    plain, _ = batches(world, ["instances", "vgd"], builder_kw=kw, mode="mixed", reps=2)
    parallel, _ = batches(world, ["instances", "vgd"], builder_kw=kw, loader_kw={"num_workers": 2}, mode="mixed", reps=2)
    assert len(plain) == len(parallel) == 7
    for a, b in zip(plain, parallel, strict=True):
        assert a.keys == b.keys
        for name in ("input_ids", "labels", "cond_ids", "seg_ids", "pixel_values", "seg_pixel_values", "ignore"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        for x, y in zip(a.masks + a.regions, b.masks + b.regions, strict=True):
            assert torch.equal(x, y)
    # the same image in two passes gets two different jitters
    scaled = Counter()
    for batch in plain:
        for key, size in zip(batch.keys, batch.scaled_sizes.tolist(), strict=True):
            scaled[(key, tuple(size))] += 1
    sizes_per_key: dict[str, set] = {}
    for key, size in scaled:
        sizes_per_key.setdefault(key, set()).add(size)
    assert any(len(s) > 1 for s in sizes_per_key.values())


def test_main_branch_renders_without_the_image_newline(world):
    paper, _ = batches(world, ["instances"], g=1)
    main, _ = batches(world, ["instances"], g=1, builder_kw={"render": RenderOptions.main_branch()})
    tok = load_tokenizer(world["tokenizer"])
    newline = tok.encode("\n", add_special_tokens=False)
    after_image = lambda batch: batch.input_ids[0][(batch.input_ids[0] == IMAGE_TOKEN_INDEX).nonzero()[0, 0] + 1]  # noqa: E731
    assert int(after_image(paper[0])) == newline[0]
    assert int(after_image(main[0])) != newline[0]
