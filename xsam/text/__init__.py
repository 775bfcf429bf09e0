"""The text side of the training loader: from a rendered `Item` to token ids the LLM trains on.

`tokens` holds X-SAM's special strings, sentinel ids and the tokens added to the vocabulary;
`chat` the chat formats (Phi-3, Qwen3) that wrap each (question, answer) pair; `tokenizer` loads
a model's tokenizer with those tokens, or builds a tiny offline one for tests; `encode` turns an
item into input ids, labels, `<p>` span ids and `<SEG>` ids (spec §1.1-1.3).
"""

from xsam.text.chat import CHAT_FORMATS, ChatFormat, get_chat_format
from xsam.text.encode import EncodedText, TextTooLong, decode_for_display, encode_item
from xsam.text.tokenizer import build_tiny_tokenizer, load_tokenizer
from xsam.text.tokens import (
    ADDED_TOKENS,
    IGNORE_INDEX,
    IMAGE_TOKEN,
    IMAGE_TOKEN_INDEX,
    PHRASE_END,
    PHRASE_START,
    PLACEHOLDER_INDEX,
    REGION_TOKEN,
    REGION_TOKEN_INDEX,
    SEG_TOKEN,
    SpecialIds,
    add_special_tokens,
    special_ids,
)

__all__ = [
    "ADDED_TOKENS",
    "CHAT_FORMATS",
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "IMAGE_TOKEN_INDEX",
    "PHRASE_END",
    "PHRASE_START",
    "PLACEHOLDER_INDEX",
    "REGION_TOKEN",
    "REGION_TOKEN_INDEX",
    "SEG_TOKEN",
    "ChatFormat",
    "EncodedText",
    "SpecialIds",
    "TextTooLong",
    "add_special_tokens",
    "build_tiny_tokenizer",
    "decode_for_display",
    "encode_item",
    "get_chat_format",
    "load_tokenizer",
    "special_ids",
]
