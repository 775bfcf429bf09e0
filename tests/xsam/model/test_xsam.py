"""The whole X-SAM module on real batches of every task (tiny config, random init): instances per
`<SEG>`, shared conditions, stage recipes (which parts exist, which get gradients), region tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from builders import task_batches

from xsam.model.build import apply_stage, build_xsam, count_parameters, param_groups
from xsam.model.config import XSamConfig, load_model_config
from xsam.model.decoder import ClassHead, LinearClassHead
from xsam.text import load_tokenizer

TINY = Path(__file__).resolve().parents[3] / "configs" / "model" / "tiny.yaml"
TASK_SOURCES = {
    "genseg": "coco-instances", "refseg": "refcoco", "reaseg": "reasonseg", "vgdseg": "coco-vgd",
    "intseg": "coco-interactive", "gcgseg": "gcg-grandf", "chat": "llava",
}


@pytest.fixture(scope="module")
def cfg() -> XSamConfig:
    return load_model_config(TINY)


@pytest.fixture(scope="module")
def tok(task_world):
    return load_tokenizer(task_world["tokenizer"])


@pytest.fixture(scope="module")
def batches(task_world, cfg) -> dict:
    pre = cfg.preprocess_config()
    return {task: task_batches(task_world, name, preprocess=pre)[0] for task, name in TASK_SOURCES.items()}


def _model(cfg, tok, stage="stage3", seed=0):
    torch.manual_seed(seed)
    return build_xsam(cfg, stage=stage, tokenizer=tok)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _num_segs(batch) -> list[int]:
    return [int(batch.seg_ids[b].max()) + 1 if bool((batch.seg_ids[b] >= 0).any()) else 0 for b in range(len(batch))]


def _num_spans(batch) -> list[int]:
    return [int(batch.cond_ids[b].max()) + 1 if bool((batch.cond_ids[b] >= 0).any()) else 0 for b in range(len(batch))]


@pytest.mark.parametrize("task", sorted(TASK_SOURCES))
def test_every_task_runs_forward_and_backward(cfg, tok, batches, task) -> None:
    batch = batches[task]
    assert batch.tasks[0] == task
    model = _model(cfg, tok)
    out = model(batch, generator=_gen())
    assert torch.isfinite(out.loss) and out.loss > 0
    assert out.supervised_tokens == int((batch.labels[:, 1:] != -100).sum())
    segs = _num_segs(batch)
    if task == "chat":
        assert out.instances is None and out.class_logits is None
    else:
        # one decoder instance per <SEG>, in sample order
        assert len(out.instances) == sum(segs)
        assert out.instances.sample.tolist() == [b for b, n in enumerate(segs) for _ in range(n)]
        assert out.instances.seg.tolist() == [j for n in segs for j in range(n)]
        q = cfg.decoder.config["num_queries"]
        spans = _num_spans(batch)
        k = sum(spans) if task in cfg.conditions.shared_tasks else max(spans)
        assert out.class_logits.shape == (sum(segs), q, k + 1)
        side = cfg.preprocess["seg_size"] // 8
        assert out.mask_logits.shape == (sum(segs), q, side, side)
        assert {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_seg"} <= set(out.losses)
    out.loss.backward()
    # every part takes part in the step: a gradient (zero for an unused branch) on every parameter
    for name, part in model.parts().items():
        missing = [n for n, p in part.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, f"{task}: {name} parameters without a gradient: {missing[:3]}"
    head = model.class_head
    if task == "chat":
        assert all(float(p.grad.abs().sum()) == 0 for p in model.decoder.parameters())
    else:
        assert float(head.logit_scale.grad.abs()) > 0
        assert float(model.llm_projector.layers[0].weight.grad.abs().sum()) > 0


def test_shared_conditions_offset_the_second_samples_labels(cfg, tok, batches) -> None:
    """refseg: every instance sees the batch's conditions; sample b's targets are offset by the
    spans of the samples before it (spec §3 Bridging 7)."""
    batch = batches["refseg"]
    model = _model(cfg, tok)
    out = model(batch, compute_loss=False)
    spans = _num_spans(batch)
    assert out.condition_mask.all() and out.condition_mask.shape[1] == sum(spans)
    offsets = {b: sum(spans[:b]) for b in range(len(batch))}
    assert out.instances.condition_offset.tolist() == [offsets[b] for b in out.instances.sample.tolist()]
    targets = model._targets(batch, out.instances)
    for n, (b, j) in enumerate(zip(out.instances.sample.tolist(), out.instances.seg.tolist())):
        rows = batch.mask_segs[b] == j
        assert targets[n].classes.tolist() == (batch.mask_spans[b][rows] + offsets[b]).tolist()
        assert torch.equal(targets[n].masks, batch.masks[b][rows])


def test_unshared_conditions_are_padded_per_sample(cfg, tok, batches) -> None:
    batch = batches["vgdseg"]
    out = _model(cfg, tok)(batch, compute_loss=False)
    spans = _num_spans(batch)
    for n, b in enumerate(out.instances.sample.tolist()):
        assert out.condition_mask[n].sum() == spans[b]
        assert out.condition_mask[n, : spans[b]].all()
        # padded columns can never win: their logits are the pad value
        pad = ~out.condition_mask[n]
        assert (out.class_logits[n][:, :-1][:, pad] <= -1e8).all()
    assert out.instances.condition_offset.tolist() == [0] * len(out.instances)


def test_same_task_shared_when_configured(cfg, tok, batches) -> None:
    """`conditions.shared_tasks` decides: vgdseg shared on request."""
    shared = cfg.model_copy(update={"conditions": cfg.conditions.model_copy(update={"shared_tasks": ("vgdseg",)})})
    batch = batches["vgdseg"]
    out = _model(shared, tok)(batch, compute_loss=False)
    assert out.condition_mask.shape[1] == sum(_num_spans(batch)) and out.condition_mask.all()


def test_main_branch_uses_each_samples_last_seg_for_all_its_masks(cfg, tok, batches) -> None:
    """`conditions.decoder_instances: last_seg` (X-SAM main): one instance per sample, its last <SEG>,
    every mask of the sample as a target (classes still offset for shared conditions)."""
    main = cfg.model_copy(update={"conditions": cfg.conditions.model_copy(update={"decoder_instances": "last_seg"})})
    batch = batches["reaseg"]
    segs = _num_segs(batch)
    assert max(segs) > 1  # a multi-turn item: the two modes differ
    model = _model(main, tok)
    out = model(batch, generator=_gen())
    assert out.instances.sample.tolist() == list(range(len(batch)))
    assert out.instances.seg.tolist() == [n - 1 for n in segs]
    targets = model._targets(batch, out.instances)
    spans = _num_spans(batch)
    for b, t in enumerate(targets):
        assert len(t.classes) == len(batch.masks[b])
        assert t.classes.tolist() == (batch.mask_spans[b] + sum(spans[:b])).tolist()
    assert torch.isfinite(out.loss)


def test_stage2_trains_only_the_projectors_and_has_no_decoder(cfg, tok, batches) -> None:
    model = _model(cfg, tok, "stage2")
    assert set(model.parts()) == {"vision_encoder", "visual_projector", "seg_encoder", "seg_projector", "llm"}
    out = model(batches["refseg"], generator=_gen())
    assert out.instances is None and set(out.losses) == {"loss_llm", "loss"}
    out.loss.backward()
    for name, part in model.parts().items():
        grads = [p.grad for p in part.parameters()]
        if name in ("visual_projector", "seg_projector"):
            assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
        else:
            assert all(g is None for g in grads), f"frozen {name} got gradients"


def test_stage1_is_the_segmentor_with_the_linear_head(cfg, tok, batches) -> None:
    model = _model(cfg, tok, "stage1")
    assert set(model.parts()) == {"seg_encoder", "seg_connector", "decoder", "class_head"}
    assert isinstance(model.class_head, LinearClassHead)
    batch = batches["genseg"]
    out = model(batch, generator=_gen())
    assert len(out.instances) == len(batch) and out.instances.seg.tolist() == [-1] * len(batch)
    assert out.class_logits.shape[-1] == cfg.class_head.num_classes + 1
    targets = model._targets(batch, out.instances)
    assert [len(t.classes) for t in targets] == [len(m) for m in batch.masks]
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_param_groups_put_the_encoders_at_a_tenth(cfg, tok) -> None:
    model = _model(cfg, tok)
    stage = cfg.stage("stage3")
    groups = param_groups(model, stage, lr=4e-5, weight_decay=0.05)
    by_mult = {g["lr_mult"]: g for g in groups}
    assert set(by_mult) == {1.0, 0.1}
    assert sorted(by_mult[0.1]["parts"]) == ["seg_encoder", "vision_encoder"]
    assert by_mult[0.1]["lr"] == pytest.approx(4e-6)
    counted = sum(p.numel() for g in groups for p in g["params"])
    assert counted == sum(v["trainable"] for v in count_parameters(model).values())
    # stage 2 recipe on the same parts: only the projectors are in any group
    apply_stage(model, cfg.stage("stage2").model_copy(update={"components": tuple(model.parts())}))
    groups = param_groups(model, cfg.stage("stage2"), lr=1e-3, weight_decay=0.0)
    assert [sorted(g["parts"]) for g in groups] == [["seg_projector", "visual_projector"]]


def test_region_tokens_follow_the_prompt_mask(cfg, tok, batches) -> None:
    """intseg: the `<region>` token is pooled inside the prompt mask; another mask, another token,
    and so another condition and other class logits."""
    batch = batches["intseg"]
    assert sum(len(r) for r in batch.regions) > 0
    model = _model(cfg, tok).eval()
    with torch.no_grad():
        first = model(batch, compute_loss=False, generator=_gen())
        moved = [torch.roll(r, shifts=(batch.regions[0].shape[-1] // 2,), dims=(-1,)) for r in batch.regions]
        batch2 = type(batch)(**{**{f: getattr(batch, f) for f in batch.__slots__}, "regions": moved})
        second = model(batch2, compute_loss=False, generator=_gen())
        same = model(batch, compute_loss=False, generator=_gen())
    assert torch.equal(first.class_logits, same.class_logits)
    assert not torch.allclose(first.class_logits, second.class_logits)


def test_vgd_negative_regions_pool_another_samples_image(cfg, tok, batches) -> None:
    """A region reads the SAM grid of the image its `region_sources` entry names (spec §8: VGD
    negatives come from other samples): changing one image's grid changes exactly its regions."""
    batch = batches["vgdseg"]
    sources = torch.cat(batch.region_sources)
    assert len(batch) == 2 and set(sources.tolist()) == {0, 1}  # the fixture draws negatives across samples
    model = _model(cfg, tok).eval()
    slot = torch.arange(len(batch))
    with torch.no_grad():
        sam = model.seg_encoder(batch.seg_pixel_values)
        tokens = model.seg_projector(sam.tokens_state)
        before = torch.cat(model._region_tokens(batch, slot, tokens, _gen()))
        changed = tokens.clone()
        changed[1] += 1.0
        after = torch.cat(model._region_tokens(batch, slot, changed, _gen()))
    assert before.shape == (len(sources), 1, tokens.shape[-1])
    moved = ~torch.isclose(before, after).all(-1).all(-1)
    assert moved.tolist() == (sources == 1).tolist()


def test_paper_config_builds_on_meta_without_weights() -> None:
    cfg = load_model_config(TINY.parent / "xsam-paper.yaml")
    with torch.device("meta"):
        model = build_xsam(cfg, pretrained=False, resize_embeddings=False)
    counts = count_parameters(model)
    assert counts["llm"]["total"] == 3_821_079_552  # Phi-3-mini-4k-instruct's published count
    assert isinstance(model.class_head, ClassHead) and model.class_head.clamp == 500.0
    assert model.decoder.config.num_queries == 200 and model.decoder.config.decoder_layers == 10
    assert model.seg_connector.out_channels == (512, 1024, 2048)
    assert all(p.device.type == "meta" for p in model.parameters())
