"""The inference layout (safetensors + resolved config + tokenizer + xsam.json) and the predictor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import task_batches
from pycocotools import mask as mask_utils

from xsam.model import postprocess
from xsam.model.build import build_xsam
from xsam.model.config import load_model_config
from xsam.model.export import InferenceLayoutError, load_inference, read_meta, save_inference
from xsam.model.predict import Predictor, grounded_item, prediction_record
from xsam.text import load_tokenizer

TINY = Path(__file__).resolve().parents[3] / "configs" / "model" / "tiny.yaml"
IMAGE = Path(__file__).resolve().parents[3] / "examples" / "corpora" / "coco_panoptic" / "val2017" / "000000439180.jpg"


@pytest.fixture(scope="module")
def saved(task_world, tmp_path_factory):
    cfg = load_model_config(TINY)
    tok = load_tokenizer(task_world["tokenizer"])
    torch.manual_seed(3)
    model = build_xsam(cfg, tokenizer=tok).eval()
    out = save_inference(model, cfg, tok, tmp_path_factory.mktemp("layout") / "tiny", stage="stage3",
                         provenance={"kind": "test"})
    return model, cfg, out


def test_round_trip_gives_the_same_outputs(saved, task_world) -> None:
    model, cfg, out = saved
    loaded = load_inference(out, verify=True)
    assert loaded.stage == "stage3" and loaded.meta["provenance"] == {"kind": "test"}
    assert loaded.config.llm.pretrained is None and loaded.config.llm.tokenizer == str(out / "tokenizer")
    assert loaded.config.llm.config["vocab_size"] == len(loaded.tokenizer)
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[key]), key
    batch = task_batches(task_world, "refcoco", preprocess=cfg.preprocess_config())[0]
    with torch.no_grad():
        a = model(batch, compute_loss=False)
        b = loaded.model(batch, compute_loss=False)
    torch.testing.assert_close(a.class_logits, b.class_logits, rtol=0, atol=0)
    torch.testing.assert_close(a.mask_logits, b.mask_logits, rtol=0, atol=0)
    meta = read_meta(out)
    assert meta["parameters"]["llm"]["total"] == sum(p.numel() for p in model.llm.parameters())


def test_layouts_are_never_overwritten_and_damage_is_named(saved, tmp_path) -> None:
    model, cfg, out = saved
    with pytest.raises(FileExistsError, match="never overwritten"):
        save_inference(model, cfg, None, out, stage="stage3")
    with pytest.raises(InferenceLayoutError, match="not an X-SAM inference folder"):
        load_inference(tmp_path)
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in out.iterdir():
        if f.is_file():
            (copy / f.name).write_bytes(f.read_bytes())
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(InferenceLayoutError, match="sha256"):
        load_inference(copy, verify=True)
    # a layout whose config describes another architecture: the weights do not fit, named
    meta = json.loads((out / "xsam.json").read_text())
    stage1 = tmp_path / "stage1"
    stage1.mkdir()
    for name in ("model.safetensors", "config.yaml"):
        (stage1 / name).write_bytes((out / name).read_bytes())
    (stage1 / "xsam.json").write_text(json.dumps({**meta, "stage": "stage1"}))
    with pytest.raises(InferenceLayoutError, match="unexpected"):
        load_inference(stage1)


def test_prediction_record_validates_prompts() -> None:
    data = IMAGE.read_bytes()
    with pytest.raises(ValueError, match="comma-separated category names"):
        prediction_record("genseg", data)
    with pytest.raises(ValueError, match="inside the 640x360 image"):
        prediction_record("intseg", data, points=[(700, 10)])
    with pytest.raises(ValueError, match="exactly one"):
        prediction_record("intseg", data, points=[(1, 1)], boxes=[(0, 0, 5, 5)])
    with pytest.raises(ValueError, match="cannot be predicted"):
        prediction_record("chat", data)
    record, vocabulary, labels = prediction_record("genseg", data, prompt="person, horse ,, sky")
    assert labels == ["person", "horse", "sky"] and [c.id for c in vocabulary] == [1, 2, 3]


@pytest.mark.parametrize("task,kwargs", [
    ("refseg", {"prompt": "the horse on the left"}),
    ("reaseg", {"prompt": "which animal is being ridden by the person in red?"}),
    ("intseg", {"boxes": [(100, 150, 220, 330)]}),
    ("vgdseg", {"points": [(150, 250)], "boxes": [(400, 150, 480, 300)]}),
    ("genseg", {"prompt": "person, horse, tree"}),
])
def test_predictor_equals_the_model_plus_post_processing(saved, task, kwargs) -> None:
    """The predictor's masks are exactly what the forward pass + spec §6 give for the rendered item."""
    _, cfg, out = saved
    loaded = load_inference(out)
    predictor = Predictor(loaded)
    data = IMAGE.read_bytes()
    result = predictor.predict(data, task, **kwargs)
    again = predictor.predict(data, task, **kwargs)  # deterministic, region points included
    assert [m.score for m in again.masks] == [m.score for m in result.masks]
    assert result.image_size == (360, 640)
    # the same item by hand
    from xsam.data.batch import collate
    from xsam.data.render import RenderOptions, load_templates, render_record

    record, vocabulary, labels = prediction_record(task, data, **kwargs)
    item = render_record(record, seed=0, epoch=0, templates=load_templates(), options=RenderOptions(mode="eval"),
                         vocabulary=vocabulary)[0]
    assert item.mode == "eval"
    sample = predictor.builder.build_item(record, item, data, source="predict")
    assert sample.num_regions == len(kwargs.get("points", ())) + len(kwargs.get("boxes", ()))
    batch = collate([sample], pad_id=predictor.builder.pad_id, preprocess=cfg.preprocess_config()).to("cpu")
    with torch.no_grad():
        raw = loaded.model(batch, compute_loss=False, generator=torch.Generator().manual_seed(0))
    geometry = batch.geometries[0]
    if task in ("refseg", "reaseg", "intseg"):
        want = postprocess.referring(raw.class_logits[0], raw.mask_logits[0], geometry.restore)
        assert len(result.masks) == 1 and np.array_equal(result.masks[0].mask, want.mask.numpy())
        assert result.masks[0].label == labels[0]
    else:
        want = postprocess.instance(raw.class_logits[0], raw.mask_logits[0], geometry.restore,
                                    threshold=cfg.postprocess.display_threshold)
        assert [m.label for m in result.masks] == [labels[i] for i in want.labels.tolist()]
        for got, mask in zip(result.masks, want.masks):
            assert np.array_equal(got.mask, mask.numpy())
    for m in result.to_json()["masks"]:
        rle = {"size": m["rle"]["size"], "counts": m["rle"]["counts"].encode()}
        assert mask_utils.decode(rle).shape == (360, 640) and int(mask_utils.area(rle)) == m["area"]


def test_grounded_item_keeps_well_formed_phrases_and_one_seg() -> None:
    record, _, _ = prediction_record("gcgseg", IMAGE.read_bytes())
    from xsam.data.render import RenderOptions, load_templates, render_record

    item = render_record(record, seed=0, epoch=0, templates=load_templates(), options=RenderOptions(mode="eval"))[0]
    fixed, phrases = grounded_item(item, "<p>A man</p> rides <p>a horse</p> </p> near <p>trees <SEG>. <SEG>")
    assert phrases == ["A man", "a horse"]
    assert fixed.turns[1].text == "<p>A man</p> rides <p>a horse</p>  near trees <SEG>. "
    assert len(fixed.spans) == 2 and len(fixed.segs) == 1
    plain, none = grounded_item(item, "A man rides a horse. <SEG>")
    assert none == [] and plain.segs == [] and "<SEG>" not in plain.turns[1].text
    unsegmented, found = grounded_item(item, "<p>A man</p> rides.")
    assert found == ["A man"] and unsegmented.segs == []  # no <SEG>: nothing to ground (as upstream)


def test_gcg_prediction_pairs_each_generated_phrase_with_a_mask(saved, monkeypatch) -> None:
    """GCG: the caption is generated (stubbed here with a fixed caption, the random model's is noise),
    then teacher-forced; each phrase gets the best query's mask of `postprocess.grounded`."""
    _, cfg, out = saved
    loaded = load_inference(out)
    predictor = Predictor(loaded)
    tok = predictor.builder._loaded()["tokenizer"]
    caption = tok("<p>the horse</p> walks past <p>the trees</p> <SEG>.", add_special_tokens=False)["input_ids"]
    calls = []

    def fake_generate(batch, **kwargs):
        calls.append((batch.input_ids.shape, kwargs["max_new_tokens"]))
        assert (batch.labels == -100).all() and (batch.seg_ids == -1).all()  # a prompt: no answer in it
        return torch.tensor([caption + [kwargs["eos_token_id"][0]]])

    monkeypatch.setattr(loaded.model, "generate", fake_generate)
    data = IMAGE.read_bytes()
    result = predictor.predict(data, "gcgseg")
    assert len(calls) == 1
    assert result.text == "<p>the horse</p> walks past <p>the trees</p> <SEG>."
    assert [m.label for m in result.masks] == ["the horse", "the trees"]
    record, _, _ = prediction_record("gcgseg", data)
    from xsam.data.batch import collate
    from xsam.data.render import RenderOptions, load_templates, render_record

    item = render_record(record, seed=0, epoch=0, templates=load_templates(), options=RenderOptions(mode="eval"))[0]
    item, _ = grounded_item(item, result.text)
    sample = predictor.builder.build_item(record, item, data, source="predict")
    batch = collate([sample], pad_id=predictor.builder.pad_id, preprocess=cfg.preprocess_config())
    with torch.no_grad():
        raw = loaded.model(batch.to("cpu"), compute_loss=False, generator=torch.Generator().manual_seed(0))
    want = postprocess.grounded(raw.class_logits[0], raw.mask_logits[0], batch.geometries[0].restore, num_phrases=2)
    for got, expected in zip(result.masks, want):
        assert np.array_equal(got.mask, expected.mask.numpy())


def test_gcg_generation_runs_for_real_and_is_greedy(saved) -> None:
    _, _, out = saved
    predictor = Predictor(load_inference(out))
    data = IMAGE.read_bytes()
    first = predictor.predict(data, "gcgseg")
    assert first.text and first.text == predictor.predict(data, "gcgseg").text
    assert first.image_size == (360, 640)


def test_load_parents_takes_each_prefix_from_its_parent(saved, task_world, tmp_path) -> None:
    from xsam.model.export import load_parents

    model, cfg, out = saved
    tok = load_tokenizer(task_world["tokenizer"])
    torch.manual_seed(11)
    stage1 = build_xsam(cfg, stage="stage1", tokenizer=tok)
    stage1_dir = save_inference(stage1, cfg, None, tmp_path / "s1", stage="stage1")
    torch.manual_seed(12)
    fresh = build_xsam(cfg, tokenizer=tok)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    report = load_parents(fresh, [(stage1_dir, ("seg_encoder", "seg_connector", "decoder")),
                                  (out, ("visual_projector", "seg_projector"))])
    state = fresh.state_dict()
    for k, v in stage1.state_dict().items():
        if k.startswith(("seg_encoder.", "seg_connector.", "decoder.")):
            assert torch.equal(state[k], v), k
    assert torch.equal(state["visual_projector.layers.0.weight"], model.state_dict()["visual_projector.layers.0.weight"])
    assert torch.equal(state["llm_projector.layers.0.weight"], before["llm_projector.layers.0.weight"])  # kept
    assert report.to_dict()["taken"] == {str(stage1_dir): len(report.taken[str(stage1_dir)]),
                                         str(out): len(report.taken[str(out)])}
    with pytest.raises(InferenceLayoutError, match="missing"):  # a stage-1 folder has no LLM
        load_parents(fresh, [(stage1_dir, ("llm",))])
    with pytest.raises(InferenceLayoutError, match="covered twice"):
        load_parents(fresh, [(stage1_dir, ("decoder",)), (out, ("decoder",))])
    with pytest.raises(InferenceLayoutError, match=r"unexpected \['class_head.linear.bias'"):  # linear vs cosine
        load_parents(fresh, [(stage1_dir, ("class_head",))])
