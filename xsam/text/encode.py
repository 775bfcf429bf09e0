"""Encode an `Item` into the per-token arrays the model trains on: ids, labels, span and `<SEG>` indices.

Spec: /work/shared/xsam-spec.md §1.1 (sentinels, `cond_ids`/`seg_ids`), §1.2 (chat wrapping, only
answers supervised), §1.3 (GCG evaluation generates the caption). Upstream: xtuner's
`template_map_fn` + X-SAM's `encode_fn` (`xsam/xsam/dataset/utils/encode.py`) and
`base_dataset.py::_get_cond_ids`.

Like upstream, each pair is `[BOS] instruction(question) answer_prefix | answer suffix [EOS] | sep`
with only the middle part supervised, and only `<image>`/`<region>` are cut out of the text (they
become sentinel ids); everything else, `<SEG>`/`<p>`/`</p>` and the chat markers included, goes
through `tokenizer.encode`, which maps added tokens to their ids. Cutting the text around `<p>`
ourselves would change tokens next to a span for SentencePiece-style tokenizers that prepend "▁"
only at the start of the text (Metaspace `prepend_scheme="first"`): "<p>the" would become
"<p>▁the", which the released weights never saw. For byte-level BPE (Qwen, the tiny tokenizer)
both give the same ids.

Unlike upstream, which cuts `input_ids` at `max_length` (possibly inside a span, or leaving a span
without its `<SEG>`), a too-long item loses whole trailing (question, answer) pairs, and the
result says how many turns, spans and `<SEG>`s it kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from xsam.data.schema import Item
from xsam.text.chat import ChatFormat
from xsam.text.tokens import (
    ADDED_TOKENS,
    IGNORE_INDEX,
    IMAGE_TOKEN,
    IMAGE_TOKEN_INDEX,
    PHRASE_END,
    PHRASE_START,
    REGION_TOKEN,
    REGION_TOKEN_INDEX,
    SEG_TOKEN,
    special_ids,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_SENTINELS = {IMAGE_TOKEN: IMAGE_TOKEN_INDEX, REGION_TOKEN: REGION_TOKEN_INDEX}
_SENTINEL_NAMES = {v: k for k, v in _SENTINELS.items()}
_SENTINEL_SPLIT = re.compile(f"({re.escape(IMAGE_TOKEN)}|{re.escape(REGION_TOKEN)})")
_PHRASE_MARK = re.compile(f"{re.escape(PHRASE_START)}|{re.escape(PHRASE_END)}")

Truncation = Literal["drop_turns", "error"]


class TextTooLong(ValueError):
    """An item whose text does not fit `max_length` (skip it, or raise the limit)."""

    def __init__(self, key: str, length: int, limit: int, why: str) -> None:
        super().__init__(f"item {key}: {why} ({length} tokens > max_length {limit})")
        self.key, self.length, self.limit = key, length, limit


@dataclass(kw_only=True, slots=True)
class EncodedText:
    """One item's text as aligned per-token lists (all of length `len(input_ids)`).

    `input_ids` holds IMAGE_TOKEN_INDEX / REGION_TOKEN_INDEX where `<image>` / `<region>` stood;
    `labels` is IGNORE_INDEX except on answer and suffix tokens; `cond_ids[t] = k` on the k-th
    `<p>...</p>` span (delimiters included, k indexes `Item.spans`), `seg_ids[t] = j` on the j-th
    `<SEG>` (j indexes `Item.segs`), -1 elsewhere. Only the first `turns_kept` turns, `spans_kept`
    spans and `segs_kept` `<SEG>`s of the item are encoded (`truncated` when that is not all).
    """

    input_ids: list[int]
    labels: list[int]
    cond_ids: list[int]
    seg_ids: list[int]
    turns_kept: int
    spans_kept: int
    segs_kept: int
    truncated: bool
    image_count: int  # IMAGE_TOKEN_INDEX positions: image features to splice in
    region_count: int  # REGION_TOKEN_INDEX positions: region features to splice in


def _tokenize(text: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """`text` as ids, with the sentinel id where `<image>` / `<region>` stand."""
    ids: list[int] = []
    for chunk in _SENTINEL_SPLIT.split(text):
        if chunk in _SENTINELS:
            ids.append(_SENTINELS[chunk])
        elif chunk:
            ids.extend(tokenizer.encode(chunk, add_special_tokens=False))
    return ids


def _check_turns(item: Item) -> None:
    roles = [t.role for t in item.turns]
    if not roles or len(roles) % 2 or any(r != ("user", "assistant")[i % 2] for i, r in enumerate(roles)):
        raise ValueError(f"item {item.key}: turns must be (user, assistant) pairs, got roles {roles}")
    for i, turn in enumerate(item.turns):
        depth = 0
        for mark in _PHRASE_MARK.findall(turn.text):
            depth += 1 if mark == PHRASE_START else -1
            if depth not in (0, 1):
                break
        if depth != 0:
            raise ValueError(f"item {item.key}: turn {i} has unbalanced or nested {PHRASE_START}...{PHRASE_END}")
        if turn.role == "assistant" and _SENTINEL_SPLIT.search(turn.text):
            # an answer is supervised: a sentinel there would be a negative label id
            raise ValueError(f"item {item.key}: answer turn {i} holds {IMAGE_TOKEN} or {REGION_TOKEN}")


def encode_item(
    item: Item,
    tokenizer: PreTrainedTokenizerBase,
    chat_format: ChatFormat,
    *,
    max_length: int | None = None,
    truncation: Truncation = "drop_turns",
    include_last_answer: bool = True,
    system: str = "",
) -> EncodedText:
    """Wrap `item`'s turns in `chat_format` and encode them (see the module docstring).

    Args:
        tokenizer: a tokenizer that has `ADDED_TOKENS` (`load_tokenizer` / `add_special_tokens`).
        max_length: the most positions `input_ids` may have (a sentinel counts 1; the image
            features that replace it do not: X-SAM's Phi-3 limit is 4096 - 729 - 1024 = 2343).
        truncation: "drop_turns" drops trailing (question, answer) pairs until the text fits;
            "error" raises `TextTooLong` instead. Both raise when the first pair alone is too long.
        include_last_answer: False encodes a generation prompt: everything up to the last
            question's assistant tag (and `answer_prefix`), without the last answer, all labels
            ignored (GCG evaluation generates the caption). Such a prompt is never truncated:
            dropping turns would drop the question being asked, so it raises `TextTooLong`.
        system: a system prompt for the first turn (X-SAM uses none).
    """
    if truncation not in ("drop_turns", "error"):
        raise ValueError(f"truncation must be 'drop_turns' or 'error', got {truncation!r}")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if system and not chat_format.system:
        raise ValueError(f"chat format {chat_format.name!r} has no system template")
    if any(token in system for token in (*_SENTINELS, *ADDED_TOKENS)):
        raise ValueError("the system prompt must not hold <image>, <region>, <SEG>, <p> or </p>")
    _check_turns(item)
    ids = special_ids(tokenizer)
    bos = tokenizer.bos_token_id if chat_format.bos else None

    n_pairs = len(item.turns) // 2
    blocks: list[tuple[list[int], list[int]]] = []  # (input_ids, labels) of each pair
    for p in range(n_pairs):
        question, answer = item.turns[2 * p].text, item.turns[2 * p + 1].text
        block: list[int] = []
        # xtuner: BOS before the first turn, and again after each turn that ended with EOS
        if bos is not None and (p == 0 or not chat_format.suffix_as_eos):
            block.append(bos)
        prompt = chat_format.system.format(system=system) if system and p == 0 else ""
        prompt += chat_format.instruction.format(input=question) + chat_format.answer_prefix
        block += _tokenize(prompt, tokenizer)
        block_labels = [IGNORE_INDEX] * len(block)
        if include_last_answer or p < n_pairs - 1:
            output = tokenizer.encode(answer + chat_format.suffix, add_special_tokens=False)
            if not chat_format.suffix_as_eos:
                output.append(ids.eos)
            sep = tokenizer.encode(chat_format.sep, add_special_tokens=False) if chat_format.sep else []
            block += output + sep
            block_labels += output + [IGNORE_INDEX] * len(sep)
        blocks.append((block, block_labels))

    kept = n_pairs
    total = sum(len(b) for b, _ in blocks)
    if max_length is not None and total > max_length:
        if truncation == "error":
            raise TextTooLong(item.key, total, max_length, "text too long")
        if not include_last_answer:
            raise TextTooLong(item.key, total, max_length, "generation prompt too long")
        kept = length = 0
        while length + len(blocks[kept][0]) <= max_length:  # stops before the end: total > max_length
            length += len(blocks[kept][0])
            kept += 1
        if kept == 0:
            why = "the first (question, answer) pair alone is too long"
            raise TextTooLong(item.key, len(blocks[0][0]), max_length, why)

    input_ids = [t for block, _ in blocks[:kept] for t in block]
    if include_last_answer:
        labels = [t for _, block_labels in blocks[:kept] for t in block_labels]
    else:  # a generation prompt is not trained on, earlier answers included
        labels = [IGNORE_INDEX] * len(input_ids)
    turns_kept = 2 * kept - (0 if include_last_answer else 1)
    texts = [t.text for t in item.turns[:turns_kept]]
    for token, tid in zip(ADDED_TOKENS, (ids.seg, ids.p_start, ids.p_end), strict=True):
        if sum(text.count(token) for text in texts) != input_ids.count(tid):
            raise ValueError(
                f"item {item.key}: the tokenizer does not encode every {token} as its one id {tid}; "
                "load it with xsam.text.load_tokenizer (which adds the X-SAM tokens)"
            )

    cond_ids = [-1] * len(input_ids)
    seg_ids = [-1] * len(input_ids)
    n_spans = n_segs = start = 0
    for t, tid in enumerate(input_ids):
        if tid == ids.p_start:
            start = t
        elif tid == ids.p_end:
            cond_ids[start : t + 1] = [n_spans] * (t + 1 - start)
            n_spans += 1
        elif tid == ids.seg:
            seg_ids[t] = n_segs
            n_segs += 1
    spans_kept = sum(1 for s in item.spans if s.turn < turns_kept)
    segs_kept = sum(1 for s in item.segs if s.turn < turns_kept)
    if (n_spans, n_segs) != (spans_kept, segs_kept):
        raise ValueError(
            f"item {item.key}: its first {turns_kept} turns hold {n_spans} spans and {n_segs} {SEG_TOKEN}, "
            f"but Item.spans/segs give {spans_kept} and {segs_kept} to them (wrong `turn` fields)"
        )
    return EncodedText(
        input_ids=input_ids,
        labels=labels,
        cond_ids=cond_ids,
        seg_ids=seg_ids,
        turns_kept=turns_kept,
        spans_kept=spans_kept,
        segs_kept=segs_kept,
        truncated=kept < n_pairs,
        image_count=input_ids.count(IMAGE_TOKEN_INDEX),
        region_count=input_ids.count(REGION_TOKEN_INDEX),
    )


def decode_for_display(ids: list[int], tokenizer: PreTrainedTokenizerBase) -> str:
    """`ids` as text, special tokens kept and sentinels shown as `<image>` / `<region>`.

    Other negative ids (IGNORE_INDEX in labels) are an error: filter them out first.
    """
    parts: list[str] = []
    run: list[int] = []
    for tid in [*ids, None]:
        if tid is not None and tid >= 0:
            run.append(tid)
            continue
        if run:
            parts.append(tokenizer.decode(run, skip_special_tokens=False, clean_up_tokenization_spaces=False))
            run = []
        if tid is not None:
            if tid not in _SENTINEL_NAMES:
                sentinels = f"{IMAGE_TOKEN_INDEX}, {REGION_TOKEN_INDEX}"
                raise ValueError(f"id {tid} is neither a token nor a sentinel ({sentinels})")
            parts.append(_SENTINEL_NAMES[tid])
    return "".join(parts)
