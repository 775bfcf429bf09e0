"""The sample contract: `Record` (what a shard stores), `Item` (what a model sees), rendering.

`schema` defines the typed records and items (JSON Schema under `docs/schema/`), `masks` the RLE
codec, `render` turns (record, seed, epoch, item index) into items with X-SAM's templates
(`templates.yaml`), and `views` derives the semantic/instance views of panoptic records.
"""

from xsam.data.schema import (
    SCHEMA_VERSION,
    TASKS,
    RLE,
    ChatTurn,
    Image,
    Item,
    Record,
    SegAnswer,
    Segment,
    SegTarget,
    ShardSample,
    Source,
    Span,
    Turn,
    VisualPrompt,
    item_key,
    make_key,
)

__all__ = [
    "SCHEMA_VERSION",
    "TASKS",
    "RLE",
    "ChatTurn",
    "Image",
    "Item",
    "Record",
    "SegAnswer",
    "Segment",
    "SegTarget",
    "ShardSample",
    "Source",
    "Span",
    "Turn",
    "VisualPrompt",
    "item_key",
    "make_key",
]
