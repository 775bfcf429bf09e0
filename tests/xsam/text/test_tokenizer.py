"""Tests of xsam.text.tokenizer: the tiny offline tokenizer (deterministic, lossless) and loading."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from text_records import tiny_tokenizer

from xsam.data.render import load_templates
from xsam.text import CHAT_FORMATS, build_tiny_tokenizer, load_tokenizer
from xsam.text.tokenizer import CHAT_MARKERS
from xsam.text.tokens import ADDED_TOKENS, add_special_tokens


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_build_is_byte_identical_and_fast(tmp_path: Path, tok) -> None:
    first = build_tiny_tokenizer(tmp_path / "a")  # imports are paid by the `tok` fixture
    start = time.perf_counter()
    second = build_tiny_tokenizer(tmp_path / "b")
    assert time.perf_counter() - start < 0.5
    assert first == tmp_path / "a"
    assert files(first) == files(second)
    assert set(files(first)) >= {"tokenizer.json", "tokenizer_config.json"}


def test_special_tokens(tok) -> None:
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert tok.vocab_size == 512 and len(tok) == 512 + len(ADDED_TOKENS)
    assert tok.convert_ids_to_tokens(list(range(512, 515))) == list(ADDED_TOKENS)
    assert add_special_tokens(tok) == 0  # the saved tokenizer already has them
    for marker in (*CHAT_MARKERS, *ADDED_TOKENS):
        ids = tok.encode(f"a{marker}b", add_special_tokens=False)
        assert len(ids) == 3 and tok.convert_ids_to_tokens(ids[1]) == marker


def test_every_chat_marker_of_every_format_is_one_token(tok) -> None:
    used = {m for f in CHAT_FORMATS.values() for s in (f.system, f.instruction, f.suffix, f.answer_prefix)
            for m in re.findall(r"<\|\w+\|>|</?think>", s)}
    assert used == set(CHAT_MARKERS)


def test_templates_round_trip_exactly(tok) -> None:
    texts = [t.text for groups in load_templates().groups.values() for g in groups.values() for t in g]
    texts += ["<p>A man</p>  walks <p>a dog</p>  in <p>the park</p> . And <SEG>.", "café, naïve — 東京 🙂"]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) == text


def test_smaller_vocabulary(tmp_path: Path) -> None:
    small = load_tokenizer(build_tiny_tokenizer(tmp_path, vocab_size=300))
    assert small.vocab_size == 300 and small.convert_tokens_to_ids("<SEG>") == 300


def test_load_tokenizer_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'missing'} is not a tokenizer folder"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty is not a tokenizer folder"):
        load_tokenizer(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"cannot load the tokenizer in {broken}"):
        load_tokenizer(broken)
