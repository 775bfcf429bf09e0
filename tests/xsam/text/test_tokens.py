"""Tests of xsam.text.tokens: X-SAM's sentinel ids and the tokens added to a tokenizer (spec §1.1)."""

from __future__ import annotations

import pytest
from text_records import tiny_tokenizer
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from xsam.data import schema
from xsam.text import tokens
from xsam.text.tokens import ADDED_TOKENS, SpecialIds, add_special_tokens, special_ids


def bare_tokenizer(**special: str) -> PreTrainedTokenizerFast:
    """A word-level tokenizer that has never seen X-SAM's tokens."""
    vocab = {"<unk>": 0, "</s>": 1, "<pad>": 2, "hello": 3}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")), unk_token="<unk>", **special
    )


def test_spec_values() -> None:
    assert (tokens.IMAGE_TOKEN_INDEX, tokens.REGION_TOKEN_INDEX) == (-200, -300)
    assert (tokens.IGNORE_INDEX, tokens.PLACEHOLDER_INDEX) == (-100, -1000)
    assert ADDED_TOKENS == ("<SEG>", "<p>", "</p>")
    for name in ("IMAGE_TOKEN", "REGION_TOKEN", "SEG_TOKEN", "PHRASE_START", "PHRASE_END"):
        assert getattr(tokens, name) == getattr(schema, name)
    assert (tokens.IMAGE_TOKEN, tokens.REGION_TOKEN) == ("<image>", "<region>")


def test_add_special_tokens_is_idempotent_and_counts_new_tokens() -> None:
    tok = bare_tokenizer(eos_token="</s>")
    with pytest.raises(ValueError, match=r"has no '<SEG>' token: call xsam.text.add_special_tokens"):
        special_ids(tok)
    assert add_special_tokens(tok) == 3
    assert add_special_tokens(tok) == 0
    assert len(tok) == 4 + 3
    ids = special_ids(tok)
    assert ids == SpecialIds(seg=4, p_start=5, p_end=6, pad=1, eos=1)  # no pad token: pad falls back to eos
    # each added token is one id, and never split out of running text
    assert tok.encode("hello<SEG><p>hello</p>", add_special_tokens=False) == [3, 4, 5, 3, 6]


def test_special_ids_read_pad_and_eos() -> None:
    tok = bare_tokenizer(eos_token="</s>", pad_token="<pad>")
    add_special_tokens(tok)
    assert (special_ids(tok).pad, special_ids(tok).eos) == (2, 1)
    no_eos = bare_tokenizer()
    add_special_tokens(no_eos)
    with pytest.raises(ValueError, match="no eos token"):
        special_ids(no_eos)


def test_special_ids_of_the_tiny_tokenizer(tmp_path) -> None:
    tok = tiny_tokenizer(tmp_path)
    ids = special_ids(tok)
    assert tok.convert_ids_to_tokens([ids.seg, ids.p_start, ids.p_end, ids.pad, ids.eos]) == [
        "<SEG>", "<p>", "</p>", "<pad>", "</s>"
    ]
