"""xsam.model.llm: splicing visual tokens into rendered, encoded items, span / `<SEG>` read-out, and the
embedding resize (spec §1.1, §3 "LLM", "Bridging LLM -> decoder", "Visual prompts", §8).

Items are rendered by `xsam.data.render` and encoded by `xsam.text.encode_item` with the tiny offline
tokenizer, as the loader does; the LLM is a tiny random `Qwen3ForCausalLM`.
"""

from __future__ import annotations

import pytest
import torch
from text_records import refseg_record, render_one, text_only_chat_record, tiny_tokenizer, vgdseg_record
from transformers import Qwen3Config, Qwen3ForCausalLM

from xsam.text import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    REGION_TOKEN_INDEX,
    EncodedText,
    encode_item,
    get_chat_format,
    special_ids,
)
from xsam.model.llm import SplicedInputs, resize_for_added_tokens, seg_states, span_means, splice_visual

N_IMG, T, D = 7, 3, 64  # image tokens per image, tokens per region (3 to see a span cover several), width


def _tiny_lm(vocab_size: int) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=vocab_size, hidden_size=D, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         tie_word_embeddings=False)
    return Qwen3ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def encoded(tok) -> list[EncodedText]:
    """refseg (image, 3 spans, 3 `<SEG>`), vgdseg (image, one `<p><region></p>` per region), text-only chat."""
    fmt = get_chat_format("qwen3_instruct")
    records = [refseg_record(), vgdseg_record(), text_only_chat_record()]
    return [encode_item(render_one(r), tok, fmt) for r in records]


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    out = torch.full((len(rows), max(map(len, rows))), value, dtype=torch.long)
    for b, row in enumerate(rows):
        out[b, : len(row)] = torch.tensor(row)
    return out


def _batch(encoded: list[EncodedText], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded like `xsam.data.batch.collate`."""
    return {
        "input_ids": _pad([e.input_ids for e in encoded], pad),
        "attention_mask": _pad([[1] * len(e.input_ids) for e in encoded], 0).bool(),
        "labels": _pad([e.labels for e in encoded], IGNORE_INDEX),
        "cond_ids": _pad([e.cond_ids for e in encoded], -1),
        "seg_ids": _pad([e.seg_ids for e in encoded], -1),
    }


def _visual(encoded: list[EncodedText], *, grad: bool = False) -> tuple[list[torch.Tensor | None], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    images = [torch.randn(N_IMG, D, generator=g, requires_grad=grad) if e.image_count else None for e in encoded]
    regions = [torch.randn(e.region_count, T, D, generator=g, requires_grad=grad) for e in encoded]
    return images, regions


class RecordingEmbedding(torch.nn.Embedding):
    """An embedding that records the ids it is asked for: `splice_visual` must pass real ids only."""

    def __init__(self, num: int, dim: int) -> None:
        super().__init__(num, dim)
        self.seen: list[torch.Tensor] = []

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.seen.append(ids.detach().clone())
        return super().forward(ids)


def _splice(tok, encoded, embed, *, grad: bool = False) -> tuple[SplicedInputs, dict, list, list]:
    batch = _batch(encoded, special_ids(tok).pad)
    images, regions = _visual(encoded, grad=grad)
    return splice_visual(**batch, embed=embed, image_tokens=images, region_tokens=regions), batch, images, regions


def test_items_have_the_expected_sentinels(encoded) -> None:
    vgd_regions = encoded[1].region_count  # 2 own prompts plus the rendered negatives
    assert vgd_regions >= 2
    assert [(e.image_count, e.region_count) for e in encoded] == [(1, 0), (1, vgd_regions), (0, 0)]
    assert [max(e.cond_ids) + 1 for e in encoded] == [3, vgd_regions, 0]  # one <p><region></p> per region


def test_shapes_and_visual_tokens_land_where_the_sentinels_were(tok, encoded) -> None:
    embed = RecordingEmbedding(len(tok), D)
    out, batch, images, regions = _splice(tok, encoded, embed)
    lengths = [len(e.input_ids) - e.image_count - e.region_count + N_IMG * e.image_count + T * e.region_count
               for e in encoded]
    B, L = len(encoded), max(lengths)
    assert out.inputs_embeds.shape == (B, L, D)
    for t in (out.attention_mask, out.labels, out.cond_ids, out.seg_ids, out.position_ids):
        assert t.shape == (B, L)
    assert out.attention_mask.sum(1).tolist() == lengths
    assert torch.equal(out.position_ids, torch.arange(L).expand(B, L))

    # only real ids reach the embedding, each real token once
    (seen,) = embed.seen
    assert seen.min() >= 0 and len(seen) == sum(len(e.input_ids) - e.image_count - e.region_count for e in encoded)

    weight = embed.weight.detach()
    for b, e in enumerate(encoded):
        row, t = out.inputs_embeds[b].detach(), 0
        region = 0
        for tid in e.input_ids:
            if tid == IMAGE_TOKEN_INDEX:
                torch.testing.assert_close(row[t : t + N_IMG], images[b])
                t += N_IMG
            elif tid == REGION_TOKEN_INDEX:
                torch.testing.assert_close(row[t : t + T], regions[b][region])
                t, region = t + T, region + 1
            else:
                torch.testing.assert_close(row[t], weight[tid])
                t += 1
        assert t == lengths[b]
        assert not row[t:].any() and not out.attention_mask[b, t:].any()
        assert (out.labels[b, t:] == IGNORE_INDEX).all() and (out.cond_ids[b, t:] == -1).all()

    # the image sits exactly at the -200 position (the prefix before it is unchanged)
    p = encoded[0].input_ids.index(IMAGE_TOKEN_INDEX)
    torch.testing.assert_close(out.inputs_embeds[0, p : p + N_IMG].detach(), images[0])


def _inserted(e: EncodedText) -> list[bool]:
    """Per spliced position: True where a visual token was inserted."""
    width = {IMAGE_TOKEN_INDEX: N_IMG, REGION_TOKEN_INDEX: T}
    flags: list[bool] = []
    for tid in e.input_ids:
        flags += [True] * width[tid] if tid < 0 else [False]
    return flags


def test_labels_and_seg_ids_of_inserted_positions_and_answers_in_order(tok, encoded) -> None:
    out, *_ = _splice(tok, encoded, RecordingEmbedding(len(tok), D))
    for b, e in enumerate(encoded):
        n = int(out.attention_mask[b].sum())
        inserted = torch.tensor(_inserted(e))
        labels, seg = out.labels[b, :n], out.seg_ids[b, :n]
        assert (labels[inserted] == IGNORE_INDEX).all() and (seg[inserted] == -1).all()
        text = [i for i, tid in enumerate(e.input_ids) if tid >= 0]
        assert labels[~inserted].tolist() == [e.labels[i] for i in text]
        assert seg[~inserted].tolist() == [e.seg_ids[i] for i in text]
        answers = [x for x in e.labels if x != IGNORE_INDEX]
        assert answers and labels[labels != IGNORE_INDEX].tolist() == answers


def test_region_span_covers_its_region_tokens(tok, encoded) -> None:
    ids = special_ids(tok)
    out, *_ = _splice(tok, encoded, RecordingEmbedding(len(tok), D))
    e = encoded[1]
    n = int(out.attention_mask[1].sum())
    cond = out.cond_ids[1, :n]
    inserted = torch.tensor(_inserted(e))
    # image tokens are in no span
    p = e.input_ids.index(IMAGE_TOKEN_INDEX)
    assert (cond[p : p + N_IMG] == -1).all()
    # each span k is exactly <p>, its T region tokens, </p>
    for k in range(e.region_count):
        where = (cond == k).nonzero().squeeze(1)
        assert where.tolist() == list(range(int(where[0]), int(where[0]) + T + 2))
        assert inserted[where].tolist() == [False] + [True] * T + [False]
    # the text positions of the span are the <p> and </p> ids
    text_ids = torch.tensor([t for t in e.input_ids if t >= 0])
    spans = cond[~inserted]
    assert text_ids[spans >= 0].tolist() == [ids.p_start, ids.p_end] * e.region_count
    # the refseg spans (text only) are unchanged apart from the shift by the image
    r = encoded[0]
    n0 = int(out.attention_mask[0].sum())
    text_cond = [c for c, t in zip(r.cond_ids, r.input_ids, strict=True) if t >= 0]
    assert out.cond_ids[0, :n0][~torch.tensor(_inserted(r))].tolist() == text_cond


def test_tiny_lm_forward_and_gradients_reach_the_visual_tokens(tok, encoded) -> None:
    lm = _tiny_lm(len(tok))
    out, _, images, regions = _splice(tok, encoded, lm.get_input_embeddings(), grad=True)
    result = lm(inputs_embeds=out.inputs_embeds, attention_mask=out.attention_mask, position_ids=out.position_ids,
                labels=out.labels, output_hidden_states=True)
    assert result.logits.shape == (*out.labels.shape, len(tok))
    assert torch.isfinite(result.loss)
    last = result.hidden_states[-1]
    # a side loss on the span and <SEG> read-outs, as the decoder would use them
    side = sum(m.sum() for m in span_means(last, out.cond_ids)) + sum(s.sum() for s in seg_states(last, out.seg_ids))
    (result.loss + side).backward()
    for tokens in [images[0], images[1], regions[1]]:
        assert tokens.grad is not None and tokens.grad.abs().sum() > 0
    assert lm.get_input_embeddings().weight.grad.abs().sum() > 0

    # right padding is invisible: each sample alone gives the same hidden states
    with torch.no_grad():
        for b in range(len(encoded)):
            n = int(out.attention_mask[b].sum())
            alone = lm(inputs_embeds=out.inputs_embeds[b : b + 1, :n], output_hidden_states=True).hidden_states[-1]
            torch.testing.assert_close(last[b, :n], alone[0], atol=1e-5, rtol=1e-4)


def test_span_means_is_the_hand_computed_mean(tok, encoded) -> None:
    out, *_ = _splice(tok, encoded, RecordingEmbedding(len(tok), D))
    hidden = torch.randn(*out.cond_ids.shape, D, generator=torch.Generator().manual_seed(3))
    means = span_means(hidden, out.cond_ids)
    assert [m.shape for m in means] == [(3, D), (encoded[1].region_count, D), (0, D)]
    for b, m in enumerate(means):
        for k in range(m.shape[0]):
            rows = [hidden[b, t] for t in range(hidden.shape[1]) if out.cond_ids[b, t] == k]
            torch.testing.assert_close(m[k], torch.stack(rows).sum(0) / len(rows))
    # bf16 input: accumulated in float32, returned in bf16
    assert span_means(hidden.bfloat16(), out.cond_ids)[0].dtype == torch.bfloat16


def test_seg_states_pick_the_seg_positions(tok, encoded) -> None:
    embed = RecordingEmbedding(len(tok), D)
    out, *_ = _splice(tok, encoded, embed)
    states = seg_states(out.inputs_embeds.detach(), out.seg_ids)
    assert [s.shape[0] for s in states] == [3, 1, 0]
    seg_row = embed.weight.detach()[special_ids(tok).seg]
    for s in states:
        for row in s:
            torch.testing.assert_close(row, seg_row)
    # in <SEG> order even if read from a hidden state that differs per position
    hidden = torch.arange(out.seg_ids.numel(), dtype=torch.float32).view(*out.seg_ids.shape, 1)
    positions = [(out.seg_ids[0] == j).nonzero().item() for j in range(3)]
    assert seg_states(hidden, out.seg_ids)[0].squeeze(1).tolist() == [float(p) for p in positions]
    assert positions == sorted(positions)


def test_read_outs_reject_non_consecutive_ids() -> None:
    hidden = torch.zeros(1, 4, 2)
    with pytest.raises(ValueError, match="sample 0: cond_ids must be 0..K-1"):
        span_means(hidden, torch.tensor([[0, 0, 2, -1]]))
    with pytest.raises(ValueError, match="sample 0: a <SEG> id appears at more than one position"):
        seg_states(hidden, torch.tensor([[0, 0, -1, -1]]))


def test_resize_adds_rows_with_the_mean_init(tok) -> None:
    base = len(tok) - 3  # the tiny tokenizer's vocabulary before <SEG>, <p>, </p>
    lm = _tiny_lm(base)
    old_in = lm.get_input_embeddings().weight.detach().clone()
    old_out = lm.get_output_embeddings().weight.detach().clone()
    resize_for_added_tokens(lm, tok)
    new_in, new_out = lm.get_input_embeddings().weight.detach(), lm.get_output_embeddings().weight.detach()
    assert new_in.shape == new_out.shape == (len(tok), D) and lm.config.vocab_size == len(tok)
    torch.testing.assert_close(new_in[:base], old_in)
    torch.testing.assert_close(new_out[:base], old_out)
    for i in tok.convert_tokens_to_ids(["<SEG>", "<p>", "</p>"]):
        torch.testing.assert_close(new_in[i], old_in.mean(0))
        torch.testing.assert_close(new_out[i], old_out.mean(0))

    # an already-resized model (a trained checkpoint) is left as it is
    with torch.no_grad():
        lm.get_input_embeddings().weight[-1] = 7.0
    resize_for_added_tokens(lm, tok)
    assert (lm.get_input_embeddings().weight[-1] == 7.0).all()


def test_resize_cuts_a_padded_vocabulary_and_reinitialises_the_added_rows(tok) -> None:
    """Like Phi-3 (32064 rows for 32011 + 3 tokens): cut to len(tokenizer), added tokens on old padding rows."""
    lm = _tiny_lm(len(tok) + 5)
    old = lm.get_input_embeddings().weight.detach().clone()
    resize_for_added_tokens(lm, tok)
    new = lm.get_input_embeddings().weight.detach()
    assert new.shape == (len(tok), D)
    torch.testing.assert_close(new[: len(tok) - 3], old[: len(tok) - 3])
    torch.testing.assert_close(new[len(tok) - 3 :], old[: len(tok) - 3].mean(0).expand(3, D))


@pytest.mark.parametrize(
    "change, match",
    [
        ("image_on_text_only", "sample 2: 0 <image> sentinels"),
        ("no_image_tokens", "sample 0: 1 <image> sentinels .* no image tokens"),
        ("missing_region", "sample 1: [2-9] <region> sentinels .* but 1 regions"),
        ("extra_region", "sample 0: 0 <region> sentinels .* but 1 regions"),
        ("unknown_negative", "sample 1: input_ids hold negative ids \\[-5\\]"),
        ("wrong_width", "sample 0: image tokens must be"),
        ("short_list", "3 samples but 2 image"),
    ],
)
def test_count_mismatches_are_value_errors_naming_the_sample(tok, encoded, change: str, match: str) -> None:
    batch = _batch(encoded, special_ids(tok).pad)
    images, regions = _visual(encoded)
    if change == "image_on_text_only":
        images[2] = torch.zeros(N_IMG, D)
    elif change == "no_image_tokens":
        images[0] = None
    elif change == "missing_region":
        regions[1] = regions[1][:1]
    elif change == "extra_region":
        regions[0] = torch.zeros(1, T, D)
    elif change == "unknown_negative":
        batch["input_ids"][1, 0] = -5
    elif change == "wrong_width":
        images[0] = torch.zeros(N_IMG, D + 1)
    else:
        images = images[:2]
    with pytest.raises(ValueError, match=match):
        splice_visual(**batch, embed=RecordingEmbedding(len(tok), D), image_tokens=images, region_tokens=regions)
