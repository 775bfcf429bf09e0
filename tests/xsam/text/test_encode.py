"""Tests of xsam.text.encode on items rendered by xsam.data.render, with the tiny offline tokenizer.

Expected texts are written out independently of `encode_item`: literal wrapped strings for a
hand-written item, and for rendered items the answer text + suffix per turn and `<p>phrase</p>`
per span, rebuilt from the item's turns and the record's phrases.
"""

from __future__ import annotations

import pytest
from text_records import (
    EVAL,
    chat_record,
    gcgseg_record,
    genseg_item,
    refseg_record,
    render_one,
    text_only_chat_record,
    tiny_tokenizer,
    two_pair_item,
    vgdseg_record,
)
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from xsam.data.render import clean_category_name
from xsam.data.schema import Item, Span, Turn
from xsam.text import (
    CHAT_FORMATS,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    REGION_TOKEN_INDEX,
    ChatFormat,
    EncodedText,
    TextTooLong,
    add_special_tokens,
    decode_for_display,
    encode_item,
    get_chat_format,
    special_ids,
)

PHI3 = get_chat_format("phi3_chat")
QWEN3 = get_chat_format("qwen3_instruct")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def text(ids: list[int], tok) -> str:
    return decode_for_display(ids, tok)


def runs(flags: list[bool]) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of True."""
    out, start = [], None
    for t, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = t
        elif not flag and start is not None:
            out.append((start, t))
            start = None
    return out


def check_lengths(enc: EncodedText) -> None:
    n = len(enc.input_ids)
    assert len(enc.labels) == len(enc.cond_ids) == len(enc.seg_ids) == n


# ------------------------------------------------------------------------------ literal wrapping


TWO_PAIRS = {
    "phi3_chat": (
        "<s><|user|>\n<image>\nPlease segment <p>the man</p> in this image.<|end|>\n<|assistant|>\n"
        "Sure, <SEG>.<|end|>\n"
        "<|user|>\nAnd <p>the dog</p>?<|end|>\n<|assistant|>\nIt is <SEG>.<|end|>\n"
    ),
    "qwen3_instruct": (
        "<|im_start|>user\n<image>\nPlease segment <p>the man</p> in this image.<|im_end|>\n"
        "<|im_start|>assistant\nSure, <SEG>.<|im_end|>\n"
        "<|im_start|>user\nAnd <p>the dog</p>?<|im_end|>\n<|im_start|>assistant\nIt is <SEG>.<|im_end|>\n"
    ),
    "qwen3_wothinking": (
        "<|im_start|>user\n<image>\nPlease segment <p>the man</p> in this image.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nSure, <SEG>.<|im_end|>\n"
        "<|im_start|>user\nAnd <p>the dog</p>?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\nIt is <SEG>.<|im_end|>\n"
    ),
}
TWO_PAIR_ANSWERS = {
    "phi3_chat": ["Sure, <SEG>.<|end|>", "It is <SEG>.<|end|>"],
    "qwen3_instruct": ["Sure, <SEG>.<|im_end|>", "It is <SEG>.<|im_end|>"],
    "qwen3_wothinking": ["Sure, <SEG>.<|im_end|>", "It is <SEG>.<|im_end|>"],
}


@pytest.mark.parametrize("name", sorted(TWO_PAIRS))
def test_two_pair_item_wraps_as_the_chat_format_literal(tok, name: str) -> None:
    enc = encode_item(two_pair_item(), tok, get_chat_format(name))
    check_lengths(enc)
    assert text(enc.input_ids, tok) == TWO_PAIRS[name]
    supervised = runs([label != IGNORE_INDEX for label in enc.labels])
    assert [text(enc.labels[a:b], tok) for a, b in supervised] == TWO_PAIR_ANSWERS[name]
    assert (enc.turns_kept, enc.spans_kept, enc.segs_kept, enc.truncated) == (4, 2, 2, False)
    assert (enc.image_count, enc.region_count) == (1, 0)
    spans = [(a, b) for k in range(2) for a, b in runs([c == k for c in enc.cond_ids])]
    assert [text(enc.input_ids[a:b], tok) for a, b in spans] == ["<p>the man</p>", "<p>the dog</p>"]


def test_bos_only_where_the_format_asks(tok) -> None:
    phi3 = encode_item(two_pair_item(), tok, PHI3).input_ids
    qwen3 = encode_item(two_pair_item(), tok, QWEN3).input_ids
    assert phi3[0] == tok.bos_token_id and phi3.count(tok.bos_token_id) == 1
    assert tok.bos_token_id not in qwen3  # the tokenizer has a BOS, Qwen3's format does not use it


def test_suffix_not_eos_appends_supervised_eos_and_bos_again(tok) -> None:
    """xtuner's encode_fn with SUFFIX_AS_EOS=False: EOS (supervised) closes each answer, BOS opens each turn."""
    plain = ChatFormat(name="plain", system="", instruction="Q: {input}\nA: ", suffix="", suffix_as_eos=False,
                       sep="\n", bos=True)
    enc = encode_item(two_pair_item(), tok, plain)
    assert text(enc.input_ids, tok) == (
        "<s>Q: <image>\nPlease segment <p>the man</p> in this image.\nA: Sure, <SEG>.</s>\n"
        "<s>Q: And <p>the dog</p>?\nA: It is <SEG>.</s>\n"
    )
    supervised = runs([label != IGNORE_INDEX for label in enc.labels])
    assert [text(enc.labels[a:b], tok) for a, b in supervised] == ["Sure, <SEG>.</s>", "It is <SEG>.</s>"]


def test_system_prompt_opens_the_first_turn_only(tok) -> None:
    enc = encode_item(two_pair_item(), tok, PHI3, system="You segment images.")
    decoded = text(enc.input_ids, tok)
    assert decoded.startswith("<s><|system|>\nYou segment images.<|end|>\n<|user|>\n<image>\nPlease")
    assert decoded.count("<|system|>") == 1
    supervised = runs([label != IGNORE_INDEX for label in enc.labels])
    assert [text(enc.labels[a:b], tok) for a, b in supervised] == TWO_PAIR_ANSWERS["phi3_chat"]
    enc_q = encode_item(two_pair_item(), tok, QWEN3, system="Be brief.")
    assert text(enc_q.input_ids, tok).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    with pytest.raises(ValueError, match="must not hold"):
        encode_item(two_pair_item(), tok, PHI3, system="say <SEG>")


def test_added_tokens_are_left_to_the_tokenizer_like_upstream() -> None:
    """X-SAM's encode_fn cuts the text at <image>/<region> only. With a Metaspace tokenizer that
    prepends "▁" at the start of the text only, cutting at <p> too would give "<p>▁the"."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    corpus = ["Please segment the man in this image.", "Sure, it is. And the dog? <|user|> <|end|> <|assistant|>"]
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                                            show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    add_special_tokens(tok)
    item = first_pairs(two_pair_item(), 1)
    enc = encode_item(item, tok, PHI3)

    def encode(s: str) -> list[int]:
        return tok.encode(s, add_special_tokens=False)

    expected = [tok.bos_token_id, *encode("<|user|>\n"), IMAGE_TOKEN_INDEX]
    expected += encode("\nPlease segment <p>the man</p> in this image.<|end|>\n<|assistant|>\n")
    expected += encode("Sure, <SEG>.<|end|>") + encode("\n")
    assert enc.input_ids == expected
    assert "▁the" not in tok.convert_ids_to_tokens([i for i in enc.input_ids if i >= 0])


# ------------------------------------------------------------------ rendered items of every task


@pytest.fixture(scope="module")
def items() -> dict[str, Item]:
    items = {
        "refseg": render_one(refseg_record()),
        "genseg": genseg_item()[0],
        "vgdseg": render_one(vgdseg_record()),
        "gcgseg": render_one(gcgseg_record()),
        "chat": render_one(chat_record()),
        "chat-text-only": render_one(text_only_chat_record()),
    }
    assert all(i.mode == "train" for i in items.values())
    return items


TASKS = ["refseg", "genseg", "vgdseg", "gcgseg", "chat", "chat-text-only"]


@pytest.mark.parametrize("name", ["phi3_chat", "qwen3_wothinking"])
@pytest.mark.parametrize("task", TASKS)
def test_labels_are_exactly_the_answers_and_suffixes(tok, items, task: str, name: str) -> None:
    item, fmt = items[task], CHAT_FORMATS[name]
    enc = encode_item(item, tok, fmt)
    check_lengths(enc)
    supervised = [label != IGNORE_INDEX for label in enc.labels]
    assert all(enc.labels[t] == enc.input_ids[t] for t in range(len(enc.labels)) if supervised[t])
    answers = [t.text + fmt.suffix for t in item.turns if t.role == "assistant"]
    assert [text(enc.labels[a:b], tok) for a, b in runs(supervised)] == answers
    # the whole sequence is the item's text with the format's markers around it
    expected = "<s>" if fmt.bos else ""
    for question, answer in zip(item.turns[::2], item.turns[1::2], strict=True):
        expected += fmt.instruction.format(input=question.text) + fmt.answer_prefix + answer.text + fmt.suffix + fmt.sep
    assert text(enc.input_ids, tok) == expected


@pytest.mark.parametrize("task", TASKS)
def test_cond_ids_cover_each_span_and_seg_ids_each_seg(tok, items, task: str) -> None:
    item = items[task]
    enc = encode_item(item, tok, PHI3)
    ids = special_ids(tok)
    spans = [runs([c == k for c in enc.cond_ids]) for k in range(len(item.spans))]
    assert all(len(r) == 1 for r in spans), "each span is one contiguous run"
    spans = [r[0] for r in spans]
    assert sum(b - a for a, b in spans) == sum(c >= 0 for c in enc.cond_ids)  # no index beyond the spans
    assert [s for s, _ in spans] == sorted(s for s, _ in spans)  # k in reading order
    for a, b in spans:
        assert enc.input_ids[a] == ids.p_start and enc.input_ids[b - 1] == ids.p_end
        assert ids.p_start not in enc.input_ids[a + 1 : b - 1] and ids.p_end not in enc.input_ids[a + 1 : b - 1]
    assert enc.input_ids.count(ids.p_start) == len(item.spans)
    seg_at = [t for t, s in enumerate(enc.seg_ids) if s >= 0]
    assert seg_at == [t for t, i in enumerate(enc.input_ids) if i == ids.seg]
    assert [enc.seg_ids[t] for t in seg_at] == list(range(len(item.segs)))
    answer_runs = runs([label != IGNORE_INDEX for label in enc.labels])
    for j, t in enumerate(seg_at):  # the j-th <SEG> sits in the answer of turn item.segs[j].turn
        a, b = answer_runs[(item.segs[j].turn - 1) // 2]
        assert a <= t < b


def span_texts(tok, enc: EncodedText) -> list[str]:
    spans = [runs([c == k for c in enc.cond_ids]) for k in range(enc.spans_kept)]
    return [text(enc.input_ids[a:b], tok) for run in spans for a, b in run]


def test_span_texts_are_the_phrases_in_span_order(tok, items) -> None:
    record = refseg_record()
    refseg = items["refseg"]
    enc = encode_item(refseg, tok, QWEN3)
    assert span_texts(tok, enc) == [f"<p>{record.phrases[s.phrase_index]}</p>" for s in refseg.spans]

    genseg, _, vocabulary = genseg_item()
    names = {c.id: clean_category_name(c.name) for c in vocabulary}
    enc = encode_item(genseg, tok, PHI3)
    assert len(genseg.spans) == 133 and enc.spans_kept == 133
    assert span_texts(tok, enc) == [f"<p>{names[s.category_id]}</p>" for s in genseg.spans]

    gcg = items["gcgseg"]  # spans in the answer: supervised, and still conditions
    enc = encode_item(gcg, tok, PHI3)
    assert span_texts(tok, enc) == ["<p>A man</p>", "<p>a dog</p>", "<p>the park</p>"]
    assert all(enc.labels[t] != IGNORE_INDEX for t, c in enumerate(enc.cond_ids) if c >= 0)


def test_sentinels_stand_where_image_and_region_were(tok, items) -> None:
    ids = special_ids(tok)
    for task in ["refseg", "genseg", "vgdseg", "gcgseg", "chat"]:
        enc = encode_item(items[task], tok, PHI3)
        assert enc.image_count == 1 and enc.input_ids.count(IMAGE_TOKEN_INDEX) == 1
        at = enc.input_ids.index(IMAGE_TOKEN_INDEX)
        assert text(enc.input_ids[:at], tok) == "<s><|user|>\n"  # first thing of the first user turn
        assert enc.labels[at] == IGNORE_INDEX
    vgd = items["vgdseg"]
    enc = encode_item(vgd, tok, PHI3)
    regions = [t for t, i in enumerate(enc.input_ids) if i == REGION_TOKEN_INDEX]
    assert enc.region_count == len(regions) == len(vgd.spans) >= 2  # 2 prompts, plus any training negatives
    for k, t in enumerate(regions):  # <p><region></p>: the region is the middle of span k
        assert enc.input_ids[t - 1 : t + 2] == [ids.p_start, REGION_TOKEN_INDEX, ids.p_end]
        assert enc.cond_ids[t - 1 : t + 2] == [k, k, k]
    assert span_texts(tok, enc) == ["<p><region></p>"] * len(vgd.spans)
    text_only = encode_item(items["chat-text-only"], tok, PHI3)
    assert (text_only.image_count, text_only.region_count) == (0, 0)
    assert text(text_only.input_ids, tok).startswith("<s><|user|>\nName a colour.<|end|>")


# ------------------------------------------------------------------------------------ truncation


def first_pairs(item: Item, n: int) -> Item:
    """`item` cut to its first n (question, answer) pairs, written independently of encode_item."""
    turns = item.turns[: 2 * n]
    return item.model_copy(update={
        "turns": turns,
        "spans": [s for s in item.spans if s.turn < 2 * n],
        "segs": [s for s in item.segs if s.turn < 2 * n],
    })


def test_truncation_drops_whole_trailing_pairs(tok, items) -> None:
    item = items["refseg"]
    assert len(item.turns) == 6
    full = encode_item(item, tok, PHI3)
    assert not full.truncated
    assert encode_item(item, tok, PHI3, max_length=len(full.input_ids)) == full
    for n in (1, 2):
        cut = encode_item(first_pairs(item, n), tok, PHI3)
        longer = encode_item(first_pairs(item, n + 1), tok, PHI3)
        for limit in (len(cut.input_ids), len(longer.input_ids) - 1):  # exactly fits / one short of n + 1
            enc = encode_item(item, tok, PHI3, max_length=limit)
            assert enc.truncated and (enc.turns_kept, enc.spans_kept, enc.segs_kept) == (2 * n, n, n)
            assert enc.input_ids == cut.input_ids and enc.labels == cut.labels
            assert enc.cond_ids == cut.cond_ids and enc.seg_ids == cut.seg_ids
            assert max(enc.cond_ids) == n - 1 and max(enc.seg_ids) == n - 1  # prefixes of spans and segs


def test_too_long_is_an_error_naming_item_length_and_limit(tok, items) -> None:
    item = items["refseg"]
    full = len(encode_item(item, tok, PHI3).input_ids)
    first = len(encode_item(first_pairs(item, 1), tok, PHI3).input_ids)
    with pytest.raises(TextTooLong, match=rf"item {item.key}: .*\({full} tokens > max_length {full - 1}\)"):
        encode_item(item, tok, PHI3, max_length=full - 1, truncation="error")
    with pytest.raises(TextTooLong, match=rf"item {item.key}: the first .* alone .*\({first} tokens > max_length 10\)"):
        encode_item(item, tok, PHI3, max_length=10)
    genseg = items["genseg"]  # one long pair (133 categories): nothing to drop
    with pytest.raises(TextTooLong) as info:
        encode_item(genseg, tok, PHI3, max_length=200)
    assert (info.value.key, info.value.limit) == (genseg.key, 200) and info.value.length > 200
    with pytest.raises(ValueError, match="truncation must be"):
        encode_item(item, tok, PHI3, truncation="cut")


def test_inconsistent_span_turns_are_caught(tok) -> None:
    item = two_pair_item()
    wrong = item.model_copy(update={"spans": [Span(turn=0), Span(turn=0)]})  # second span is in turn 2
    limit = len(encode_item(first_pairs(item, 1), tok, PHI3).input_ids)
    with pytest.raises(ValueError, match="wrong `turn` fields"):
        encode_item(wrong, tok, PHI3, max_length=limit)


# ---------------------------------------------------------------------------- generation prompts


@pytest.mark.parametrize("name", ["phi3_chat", "qwen3_wothinking"])
def test_gcg_generation_prompt_stops_before_the_caption(tok, name: str) -> None:
    item = render_one(gcgseg_record(split="val"), EVAL)
    assert item.mode == "eval" and "<p>the park</p>" in item.turns[1].text
    question = item.turns[0].text
    enc = encode_item(item, tok, get_chat_format(name), include_last_answer=False)
    expected = {
        "phi3_chat": f"<s><|user|>\n{question}<|end|>\n<|assistant|>\n",
        "qwen3_wothinking": f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
    }[name]
    assert text(enc.input_ids, tok) == expected
    assert set(enc.labels) == {IGNORE_INDEX} and set(enc.cond_ids) == {-1} and set(enc.seg_ids) == {-1}
    assert (enc.turns_kept, enc.spans_kept, enc.segs_kept, enc.truncated) == (1, 0, 0, False)


def test_generation_prompt_keeps_earlier_answers_unsupervised(tok) -> None:
    enc = encode_item(two_pair_item(), tok, PHI3, include_last_answer=False)
    assert text(enc.input_ids, tok) == (
        "<s><|user|>\n<image>\nPlease segment <p>the man</p> in this image.<|end|>\n<|assistant|>\n"
        "Sure, <SEG>.<|end|>\n<|user|>\nAnd <p>the dog</p>?<|end|>\n<|assistant|>\n"
    )
    assert set(enc.labels) == {IGNORE_INDEX}
    assert (enc.turns_kept, enc.spans_kept, enc.segs_kept) == (3, 2, 1)
    with pytest.raises(TextTooLong, match="generation prompt"):
        encode_item(two_pair_item(), tok, PHI3, include_last_answer=False, max_length=len(enc.input_ids) - 1)


# -------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("turns", "why"),
    [
        ([("assistant", "Hi."), ("user", "Hello.")], "pairs"),
        ([("user", "Hello.")], "pairs"),
        ([("user", "<p>a <p>b</p></p>"), ("assistant", "ok")], "nested"),
        ([("user", "a </p>"), ("assistant", "ok")], "unbalanced"),
        ([("user", "look"), ("assistant", "<image> here")], "answer turn 1 holds"),
    ],
    ids=["assistant-first", "no-answer", "nested-span", "close-without-open", "image-in-answer"],
)
def test_malformed_items_are_rejected_with_their_key(tok, turns, why: str) -> None:
    item = Item.model_construct(  # bypass Item's own checks: encode_item must not rely on them
        key="bad#0", record_key="bad", task="chat", mode="train", seed=0, epoch=0, index=0,
        turns=[Turn(role=r, text=t) for r, t in turns], spans=[], segs=[],
        template_ids=[],
    )
    with pytest.raises(ValueError, match=f"item bad#0: .*{why}"):
        encode_item(item, tok, PHI3)


def test_decode_for_display_refuses_ignore_labels(tok) -> None:
    assert decode_for_display([IMAGE_TOKEN_INDEX, REGION_TOKEN_INDEX], tok) == "<image><region>"
    with pytest.raises(ValueError, match="-100"):
        decode_for_display([IGNORE_INDEX], tok)
