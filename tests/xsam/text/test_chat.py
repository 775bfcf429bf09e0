"""Tests of xsam.text.chat: the registered chat formats spelled out, and their validation (spec §1.2)."""

from __future__ import annotations

import dataclasses
import re

import pytest

from xsam.text.chat import CHAT_FORMATS, get_chat_format


def test_registered_formats_are_exactly_xsams() -> None:
    assert sorted(CHAT_FORMATS) == ["phi3_chat", "qwen3_instruct", "qwen3_wothinking"]
    assert all(f.name == name for name, f in CHAT_FORMATS.items())


def test_phi3_chat_is_xtuners_template() -> None:
    phi3 = get_chat_format("phi3_chat")
    assert phi3.instruction.format(input="Q") == "<|user|>\nQ<|end|>\n<|assistant|>\n"
    assert phi3.system.format(system="S") == "<|system|>\nS<|end|>\n"
    assert (phi3.suffix, phi3.suffix_as_eos, phi3.sep, phi3.bos) == ("<|end|>", True, "\n", True)
    assert phi3.answer_prefix == ""


def test_qwen3_formats() -> None:
    instruct, nothink = get_chat_format("qwen3_instruct"), get_chat_format("qwen3_wothinking")
    for f in (instruct, nothink):
        assert f.instruction.format(input="Q") == "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
        assert f.system.format(system="S") == "<|im_start|>system\nS<|im_end|>\n"
        assert (f.suffix, f.suffix_as_eos, f.sep, f.bos) == ("<|im_end|>", True, "\n", False)
    assert instruct.answer_prefix == ""
    assert nothink.answer_prefix == "<think>\n\n</think>\n\n"


def test_unknown_name_lists_the_known_ones() -> None:
    known = "phi3_chat, qwen3_instruct, qwen3_wothinking"
    with pytest.raises(ValueError, match=f"unknown chat format 'phi3'; known: {known}"):
        get_chat_format("phi3")


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"instruction": "<|user|>\n<|end|>\n"}, "exactly one {input}"),
        ({"instruction": "{input} and {input}"}, "exactly one {input}"),
        ({"system": "<|system|>\n<|end|>\n"}, "exactly one {system}"),
        ({"answer_prefix": "<SEG>"}, "answer_prefix contains the reserved string <SEG>"),
        ({"instruction": "<image>{input}"}, "instruction contains the reserved string <image>"),
        ({"sep": "</p>"}, "sep contains the reserved string </p>"),
    ],
)
def test_malformed_formats_are_rejected(change: dict, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape("chat format 'phi3_chat': ") + ".*" + re.escape(why)):
        dataclasses.replace(get_chat_format("phi3_chat"), **change)
