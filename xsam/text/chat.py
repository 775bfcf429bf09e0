"""Chat formats: how a (question, answer) pair is wrapped in the LLM's chat markers.

Spec: /work/shared/xsam-spec.md §1.2 and §8. X-SAM wraps turns with xtuner's `template_map_fn`
and `PROMPT_TEMPLATE` (Phi-3: xtuner's own `phi3_chat`; Qwen3: X-SAM's additions `qwen3_instruct`
and `qwen3_wothinking`), and encodes them with an `encode_fn` like xtuner's. The fields here are
xtuner's template keys (SYSTEM, INSTRUCTION, SUFFIX, SUFFIX_AS_EOS, SEP), plus `bos` (xtuner asks
the tokenizer: Phi-3's has `<s>`, Qwen's has none) and `answer_prefix` (text xtuner keeps at the
end of INSTRUCTION, such as Qwen3's empty think block: unsupervised, and part of a generation
prompt). The system prompt is empty in every X-SAM config.
"""

from __future__ import annotations

import dataclasses
import string
from dataclasses import dataclass

from xsam.text.tokens import ADDED_TOKENS, IMAGE_TOKEN, REGION_TOKEN

_RESERVED = (IMAGE_TOKEN, REGION_TOKEN, *ADDED_TOKENS)


def _fields(text: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]


@dataclass(frozen=True, slots=True)
class ChatFormat:
    """One chat template.

    Args:
        name: the registry key (xtuner / X-SAM template name).
        system: format string with `{system}`, prepended to the first instruction only when a
            system prompt is given (X-SAM gives none).
        instruction: format string with `{input}`, the user turn plus the assistant tag.
        suffix: appended to every answer and supervised (the model learns to stop).
        suffix_as_eos: True when `suffix` already ends the answer (`<|end|>`, `<|im_end|>`);
            False appends the tokenizer's EOS (supervised) after it and starts the next turn
            with BOS again, as xtuner's `encode_fn` does.
        sep: text after each answer, unsupervised (the newline between turns).
        bos: prepend the tokenizer's BOS (when it has one) before the first turn.
        answer_prefix: text between the instruction and the answer, unsupervised.
    """

    name: str
    system: str
    instruction: str
    suffix: str
    suffix_as_eos: bool
    sep: str
    bos: bool
    answer_prefix: str = ""

    def __post_init__(self) -> None:
        if _fields(self.instruction) != ["input"]:
            raise ValueError(f"chat format {self.name!r}: instruction must hold exactly one {{input}} field")
        if self.system and _fields(self.system) != ["system"]:
            raise ValueError(f"chat format {self.name!r}: system must hold exactly one {{system}} field")
        for field in ("system", "instruction", "suffix", "sep", "answer_prefix"):
            for token in _RESERVED:
                if token in getattr(self, field):
                    # the loader counts these strings to index spans and <SEG>s: markers must not add any
                    raise ValueError(f"chat format {self.name!r}: {field} contains the reserved string {token}")


_QWEN3_SYSTEM = "<|im_start|>system\n{system}<|im_end|>\n"
_QWEN3_INSTRUCTION = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"

_QWEN3 = ChatFormat(
    name="qwen3_instruct",
    system=_QWEN3_SYSTEM,
    instruction=_QWEN3_INSTRUCTION,
    suffix="<|im_end|>",
    suffix_as_eos=True,
    sep="\n",
    bos=False,
)

CHAT_FORMATS: dict[str, ChatFormat] = {
    # xtuner PROMPT_TEMPLATE.phi3_chat, as X-SAM's Phi-3 configs use it (the paper model)
    "phi3_chat": ChatFormat(
        name="phi3_chat",
        system="<|system|>\n{system}<|end|>\n",
        instruction="<|user|>\n{input}<|end|>\n<|assistant|>\n",
        suffix="<|end|>",
        suffix_as_eos=True,
        sep="\n",
        bos=True,
    ),
    # X-SAM's PROMPT_TEMPLATE additions for Qwen3 (xsam/xsam/utils/template.py)
    "qwen3_instruct": _QWEN3,
    # the same, with Qwen3's empty thinking block after the assistant tag
    "qwen3_wothinking": dataclasses.replace(_QWEN3, name="qwen3_wothinking", answer_prefix="<think>\n\n</think>\n\n"),
}


def get_chat_format(name: str) -> ChatFormat:
    """The registered chat format `name`."""
    try:
        return CHAT_FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown chat format {name!r}; known: {', '.join(sorted(CHAT_FORMATS))}") from None
