"""Records and items for the xsam.text tests, rendered by the real `xsam.data.render`.

genseg uses the real COCO panoptic sample (image 439180, 133-category vocabulary); the other
tasks small hand-built records shaped like tests/xsam/data/test_render.py's.
"""

from __future__ import annotations

from pathlib import Path

import builders
from builders import panoptic_sample_record
from conftest import CORPORA

from xsam.data.render import Category, RenderOptions, load_templates, render_record
from xsam.data.schema import (
    ChatTurn,
    Item,
    Record,
    SegAnswer,
    Source,
    Span,
    Turn,
    VisualPrompt,
    make_key,
)
from xsam.text import build_tiny_tokenizer, load_tokenizer

TRAIN = RenderOptions(mode="train")
EVAL = RenderOptions(mode="eval")


def tiny_tokenizer(folder: Path):
    """The tiny offline tokenizer, built into `folder` and loaded back as a model's would be."""
    return load_tokenizer(build_tiny_tokenizer(folder))


def _source(split: str) -> Source:
    return Source(corpus="tiny", split=split, upstream_ids={"image_id": 1}, annotation_file="a.json",
                  annotation_sha256="0" * 64)


def tiny_record(task: str, n_segments: int, split: str = "train", **fields: object) -> Record:
    """`builders.tiny_record`, keyed by task too (several tasks share a split and size here)."""
    return builders.tiny_record(task, n_segments, split, key=make_key("tiny", split, task, n_segments), **fields)


def render_one(record: Record, options: RenderOptions = TRAIN, vocabulary: list[Category] | None = None) -> Item:
    (item,) = render_record(record, seed=0, epoch=0, templates=load_templates(), options=options,
                            vocabulary=vocabulary)
    return item


def refseg_record() -> Record:
    """Two objects and one no-target expression: a 3-turn-pair training item."""
    return tiny_record(
        "refseg", 2, phrases=["man in red", "dog on the right", "a purple elephant"],
        meta={"phrase_segments": [[0], [1], []]},
    )


def genseg_item(options: RenderOptions = TRAIN) -> tuple[Item, Record, list[Category]]:
    """The real COCO panoptic record 439180 rendered with the full 133-category vocabulary."""
    record, _, doc = panoptic_sample_record(CORPORA)
    vocabulary = [Category(id=c["id"], name=c["name"], isthing=bool(c["isthing"])) for c in doc["categories"]]
    return render_one(record, options, vocabulary), record, vocabulary


def vgdseg_record() -> Record:
    record = tiny_record("vgdseg", 3)
    prompts = [
        VisualPrompt(kind="mask", rle=record.segments[0].rle, segment_ids=[100, 101]),
        VisualPrompt(kind="box", geometry={"box": [2, 0, 1, 4]}, seed=5, segment_ids=[102]),
    ]
    return record.model_copy(update={"visual_prompts": prompts})


CAPTION = "A man walks a dog in the park."


def gcgseg_record(split: str = "train") -> Record:
    return tiny_record(
        "gcgseg", 3, split, phrases=["the park", "A man", "a dog"], captions=[CAPTION],
        meta={"phrase_char_spans": [[21, 29], [0, 5], [12, 17]], "phrase_segments": [[2], [0], [1]]},
    )


def _chat(*pairs: tuple[str, str]) -> list[ChatTurn]:
    turns = []
    for question, answer in pairs:
        turns += [ChatTurn.model_validate({"from": "human", "value": question}),
                  ChatTurn.model_validate({"from": "gpt", "value": answer})]
    return turns


def chat_record() -> Record:
    conversations = _chat(("What is in the picture?\n<image>", "A cat."), ("What colour is it?", "Black."))
    return tiny_record("chat", 0, conversations=conversations)


def text_only_chat_record() -> Record:
    """A LLaVA text-only conversation (`Record.image` None): its item has no `<image>`."""
    return Record(
        key=make_key("tiny", "train", "text-only"),
        task="chat",
        source=_source("train"),
        image=None,
        conversations=_chat(("Name a colour.", "Blue."), ("Another one?", "Green, like grass.")),
    )


def two_pair_item() -> Item:
    """A hand-written 2-pair item whose wrapped text the tests spell out literally."""
    return Item(
        key="tiny-two#0", record_key="tiny-two", task="refseg", mode="train", seed=0, epoch=0, index=0,
        turns=[
            Turn(role="user", text="<image>\nPlease segment <p>the man</p> in this image."),
            Turn(role="assistant", text="Sure, <SEG>."),
            Turn(role="user", text="And <p>the dog</p>?"),
            Turn(role="assistant", text="It is <SEG>."),
        ],
        spans=[Span(turn=0, phrase_index=0), Span(turn=2, phrase_index=1)],
        segs=[SegAnswer(turn=1), SegAnswer(turn=3)],
    )
