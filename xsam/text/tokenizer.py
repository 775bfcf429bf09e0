"""Load the LLM's tokenizer with X-SAM's added tokens, or build a tiny one offline for tests.

The tiny tokenizer stands in for Phi-3's / Qwen3's where no hub access exists
(/work/shared/stack-notes.md "transformers, offline"): a byte-level BPE (lossless, so any text
round-trips through `decode`) trained with `tokenizers` on an in-memory corpus of X-SAM's
templates and some English, with the chat markers of every `CHAT_FORMATS` entry as single tokens
and `ADDED_TOKENS` added the same way a real tokenizer gets them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from xsam.data.render import load_templates
from xsam.text.tokens import ADDED_TOKENS, IMAGE_TOKEN, REGION_TOKEN, add_special_tokens

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
# Every marker the strings of `xsam.text.chat.CHAT_FORMATS` use, each one token as in the real vocabularies.
CHAT_MARKERS: tuple[str, ...] = (
    "<|user|>",
    "<|end|>",
    "<|assistant|>",
    "<|system|>",
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
)

# Plain English next to the templates, so common words get merges of their own.
_ENGLISH = (
    "A man in a red shirt is walking a dog in the park.",
    "Two cats lie on a bed next to a window, and a woman reads a book.",
    "The person on the left is holding an umbrella while it rains.",
    "There is a car parked near the building across the street.",
    "What is in the picture? What colour is it? Black and white.",
    "The kitchen has a table, four chairs, a bottle and a bowl of fruit.",
    "Children play football on the grass under a blue sky with clouds.",
    "A train stops at the station; people wait on the platform.",
    "person, bicycle, car, motorcycle, airplane, bus, train, truck, boat, traffic light",
    "wall, floor wood, sky, tree, grass, road, pavement, fence, mountain, water, sand",
)
_FILL = {  # sample values for the templates' placeholders
    "categories": "person, car, wall, floor wood",
    "regions": "region, region",
    "phrase": "the man in red",
    "caption": "A man walks a dog in the park.",
    "explanation": "Chairs are for sitting.",
}
_RESERVED = re.compile("|".join(re.escape(t) for t in (IMAGE_TOKEN, REGION_TOKEN, *ADDED_TOKENS)))


def _corpus() -> list[str]:
    """The training texts, in a fixed order (templates in file order, then `_ENGLISH`)."""
    texts = [
        t.text.format_map(_FILL)
        for groups in load_templates().groups.values()
        for variants in groups.values()
        for t in variants
    ]
    # The reserved strings become added tokens: merges spent on their characters would be wasted.
    return [_RESERVED.sub(" ", t) for t in texts] + list(_ENGLISH)


def build_tiny_tokenizer(out_dir: str | Path, *, vocab_size: int = 512) -> Path:
    """Train the tiny tokenizer and `save_pretrained` it to `out_dir`; returns `out_dir`.

    Deterministic: the same call writes byte-identical files. `vocab_size` bounds the trained
    vocabulary (specials included); `ADDED_TOKENS` come after it.
    """
    # imported here: transformers takes seconds to import, and `xsam.text` users that only encode
    # items with an existing tokenizer should not pay for it
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[UNK, BOS, EOS, PAD, *CHAT_MARKERS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unk ever
        show_progress=False,
    )
    backend.train_from_iterator(_corpus(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,  # decode must give back " ." and "</p>  walks" verbatim
    )
    add_special_tokens(tokenizer)
    out = Path(out_dir)
    tokenizer.save_pretrained(out)
    return out


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in folder `path` (never the hub), with `ADDED_TOKENS` added.

    If this added tokens (a base LLM's tokenizer), the model must resize its embeddings to
    `len(tokenizer)`.
    """
    from transformers import AutoTokenizer  # slow import, see build_tiny_tokenizer

    folder = Path(path)
    if not (folder / "tokenizer_config.json").is_file() and not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{folder} is not a tokenizer folder (no tokenizer_config.json or tokenizer.json); "
            "point at a model folder, or build one with xsam.text.build_tiny_tokenizer"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load the tokenizer in {folder}: {e}") from e
    add_special_tokens(tokenizer)
    return tokenizer
