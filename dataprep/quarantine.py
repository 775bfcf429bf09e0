"""Quarantine: every upstream record is either written or quarantined with a reason, never dropped.

Two levels:
- `record`: a whole upstream unit (an image and its annotations) is rejected (`RecordRejected`);
- `part`: one segment/annotation is dropped from an otherwise good record (`QuarantineRow` with
  level `part`, collected by the converter).

`records_read == samples + quarantined` is checked at the end of every conversion.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# reason code -> what it means and what to do about it (shown by `xsam data info`).
REASONS: dict[str, str] = {
    "missing_file": "an image or mask file named by the annotations is not in the input folder/archive",
    "unsafe_path": "a file name or archive member escapes its folder ('..', absolute path) or is a link",
    "unsupported_format": "the bytes are neither JPEG nor PNG (magic bytes)",
    "truncated_image": "the image ends before its end marker (JPEG EOI / PNG IEND)",
    "corrupt_image": "the image structure is broken (bad JPEG marker, PNG chunk CRC) or does not decode",
    "decompression_bomb": "the header declares more pixels than the cap (--max-pixels)",
    "file_too_large": "an image, mask or per-image annotation file is over 1 GiB (by its size or an archive's declared size); refused unread",
    "size_mismatch": "a mask's size differs from its image's size, or the header differs from the annotations",
    "unknown_category": "an annotation names a category id that the category table lacks",
    "degenerate_polygon": "a polygon has fewer than 3 points or covers no pixel",
    "empty_mask": "a segment's mask covers no pixel",
    "duplicate_id": "an image or annotation id occurs more than once upstream",
    "invalid_annotation": "an annotation entry is malformed (missing or mistyped field)",
    "missing_annotation": "an image has no annotation entry in a corpus that needs one",
    "unlisted_segment": "a panoptic PNG holds a segment id that segments_info does not list",
    "orphan_annotation": "an annotation points at an image id that the image list lacks",
    "text_only": "a conversation without an image (LLaVA text-only): X-SAM trains on image conversations only",
    "crowd_region": "a visual prompt on a crowd annotation: crowd regions are the record's ignore mask, never a prompted target",
    "upstream_filter": "dropped by a rule of the upstream loader or release (GCG: overlapping phrase spans, caption under 3 words, phrase not in caption; gRefCOCO: a ref without sentences)",
}

LEVELS = ("record", "part")


@dataclass(kw_only=True, slots=True)
class QuarantineRow:
    """One row of `quarantine.parquet`."""

    level: str  # "record" | "part"
    source_file: str  # upstream file the bad thing was read from (base name or relative path)
    record_id: str  # upstream id of the record (image id / file name)
    part_id: str  # upstream id of the part (annotation/segment id); "" for record level
    key: str  # record key when one could be built, else ""
    reason: str  # one of REASONS
    message: str  # what exactly was wrong, naming the value

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"quarantine level must be one of {LEVELS}, got {self.level!r}")
        if self.reason not in REASONS:
            raise ValueError(f"unknown quarantine reason {self.reason!r}; add it to REASONS")
        # upstream names that are not valid UTF-8 (lone surrogates from a JSON escape or a byte file
        # name) are kept as visible escapes: the row must still be written as UTF-8 JSON and parquet
        for name in ("source_file", "record_id", "part_id", "key", "message"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, value.encode("utf-8", "backslashreplace").decode("utf-8"))

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


class Rejected(Exception):
    """Base of the 'skip and quarantine' errors: carries a reason code from REASONS."""

    def __init__(self, reason: str, message: str, *, source_file: str | None = None) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown quarantine reason {reason!r}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.source_file = source_file  # the upstream file that was bad, when not the record's image


class RecordRejected(Rejected):
    """Raised by a converter: this whole record goes to quarantine, the run goes on."""


class InputError(Exception):
    """Malformed top-level input (unparseable annotation JSON, missing folder): stop the run.

    The message names the file and the fix.
    """
