"""X-SAM's special strings, sentinel ids and the tokens it adds to the LLM vocabulary.

Spec: /work/shared/xsam-spec.md §1.1 (upstream `xsam/xsam/utils/constants.py`). `<image>` and
`<region>` never enter the vocabulary: the loader writes a negative sentinel id where they stand and
the model splices image / region features in there. `<SEG>`, `<p>` and `</p>` are added to the
tokenizer (and the embeddings resized), as upstream's `_add_special_tokens` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from xsam.data.schema import IMAGE_TOKEN, PHRASE_END, PHRASE_START, REGION_TOKEN, SEG_TOKEN

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IMAGE_TOKEN_INDEX = -200
REGION_TOKEN_INDEX = -300
IGNORE_INDEX = -100  # label of an unsupervised position (torch cross-entropy's default ignore_index)
PLACEHOLDER_INDEX = -1000

# The S3 config's `special_tokens`, in upstream's order (their ids follow the base vocabulary).
ADDED_TOKENS: tuple[str, ...] = (SEG_TOKEN, PHRASE_START, PHRASE_END)

__all__ = [
    "ADDED_TOKENS",
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "IMAGE_TOKEN_INDEX",
    "PHRASE_END",
    "PHRASE_START",
    "PLACEHOLDER_INDEX",
    "REGION_TOKEN",
    "REGION_TOKEN_INDEX",
    "SEG_TOKEN",
    "SpecialIds",
    "add_special_tokens",
    "special_ids",
]


def add_special_tokens(tokenizer: PreTrainedTokenizerBase) -> int:
    """Add `ADDED_TOKENS` as extra special tokens (never split, kept by `decode`); idempotent.

    Returns how many were new to the vocabulary: when it is not 0, the model must resize its
    token embeddings to `len(tokenizer)`.
    """
    return tokenizer.add_special_tokens(
        {"extra_special_tokens": list(ADDED_TOKENS)}, replace_extra_special_tokens=False
    )


@dataclass(frozen=True, slots=True)
class SpecialIds:
    """Token ids the loader and the model look for: `<SEG>`, `<p>`, `</p>`, padding and EOS."""

    seg: int
    p_start: int
    p_end: int
    pad: int
    eos: int


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int | None:
    """The id of `token`, or None when the tokenizer lacks it (it then answers unk, or None)."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return tid


def special_ids(tokenizer: PreTrainedTokenizerBase) -> SpecialIds:
    """The `SpecialIds` of `tokenizer`; padding falls back to EOS when it has no pad token."""
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    ids: dict[str, int] = {}
    for field, token in zip(("seg", "p_start", "p_end"), ADDED_TOKENS, strict=True):
        tid = _token_id(tokenizer, token)
        if tid is None:
            raise ValueError(
                f"tokenizer {name!r} has no {token!r} token: call xsam.text.add_special_tokens(tokenizer) "
                "(or load it with xsam.text.load_tokenizer) and resize the model's embeddings"
            )
        ids[field] = tid
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {name!r} has no eos token; set `eos_token` in its tokenizer_config.json")
    pad = tokenizer.pad_token_id
    return SpecialIds(**ids, pad=eos if pad is None else pad, eos=eos)
