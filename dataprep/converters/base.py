"""What every corpus converter provides: a driver-side plan and a worker-side record conversion.

`plan()` runs once on the driver: it parses the upstream annotation files (failing fast with
`InputError` on malformed top-level input), enumerates upstream records with stable keys, sorted by
key, and quarantines what can be decided there (duplicate ids, orphan annotations). Each planned
`UpstreamRecord` carries just the annotation data its record needs, so a Ray task receives a
small unit of work and the converter object itself stays light enough to ship to every worker.

`convert()` runs in the workers: it reads the image (and mask) bytes, validates them, builds the
`Record` and returns it with any part-level quarantine rows, or raises `RecordRejected`.
"""

from __future__ import annotations

import functools
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from dataprep.imagecheck import DEFAULT_MAX_PIXELS, ImageInfo, inspect_image
from dataprep.quarantine import InputError, QuarantineRow, RecordRejected
from dataprep.sources import FileTree, open_tree, read_annotation_file
from xsam.data.schema import Image, Record


@dataclass(kw_only=True, slots=True)
class UpstreamRecord:
    """One planned upstream unit: enough to convert it in a worker, nothing more."""

    key: str
    record_id: str  # upstream id, as text (image id / file stem)
    image_name: str  # file name relative to the images input
    est_bytes: int  # estimated shard bytes (image size on disk + margin), for unit planning
    payload: dict[str, Any]  # converter-specific upstream annotation data (JSON-able)


@dataclass(kw_only=True, slots=True)
class InputFile:
    """An annotation input whose sha256 is recorded in dataset.json."""

    option: str  # the CLI option it came from, e.g. "annotations"
    name: str  # base name
    sha256: str


@dataclass(kw_only=True, slots=True)
class Plan:
    records: list[UpstreamRecord]
    quarantine: list[QuarantineRow] = field(default_factory=list)  # decided on the driver
    inputs: list[InputFile] = field(default_factory=list)
    categories: list[dict[str, Any]] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)

    @property
    def records_read(self) -> int:
        return len(self.records) + sum(1 for row in self.quarantine if row.level == "record")


@dataclass(kw_only=True, slots=True)
class ConvertOptions:
    """Worker-side options that change the output (recorded in dataset.json)."""

    verify: str = "structural"  # "structural" | "full"
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass(kw_only=True, slots=True)
class Converted:
    record: Record
    image_bytes: bytes
    parts: list[QuarantineRow]


class Converter(ABC):
    """Base class of the corpus converters (`dataprep.converters.CONVERTERS`)."""

    name: ClassVar[str]
    task: ClassVar[str]
    version: ClassVar[str]  # bump when the same inputs would convert differently
    # option name -> help, for `xsam data list-corpora` and error messages
    required_inputs: ClassVar[dict[str, str]]
    optional_inputs: ClassVar[dict[str, str]] = {}
    example: ClassVar[str] = ""

    def __init__(self, **inputs: Any) -> None:
        missing = [opt for opt in self.required_inputs if not inputs.get(opt)]
        if missing:
            flags = " ".join(f"--{m.replace('_', '-')} ..." for m in missing)
            raise InputError(
                f"{self.name}: missing required input(s) {', '.join('--' + m.replace('_', '-') for m in missing)}; "
                f"run `xsam data convert {self.name} --out OUT {flags}` (see `xsam data list-corpora`)"
            )
        allowed = set(self.required_inputs) | set(self.optional_inputs)
        unexpected = sorted(k for k, v in inputs.items() if v is not None and k not in allowed)
        if unexpected:
            raise InputError(
                f"{self.name}: does not take {', '.join('--' + u.replace('_', '-') for u in unexpected)}"
                f" (it takes {', '.join('--' + a.replace('_', '-') for a in sorted(allowed))})"
            )
        self.inputs = {k: v for k, v in inputs.items() if v is not None}

    @abstractmethod
    def plan(self) -> Plan: ...

    @abstractmethod
    def convert(self, upstream: UpstreamRecord, options: ConvertOptions) -> Converted: ...

    def parameters(self) -> dict[str, Any]:
        """Converter inputs that change the output besides the annotation files (e.g. a split)."""
        return {}


# ---- helpers shared by converters ---------------------------------------------------------


def sha256_path(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_json_input(path: str | Path, option: str, fix: str) -> tuple[Any, InputFile]:
    """Parse a top-level annotation JSON, failing fast with a message naming the file and the fix (also
    for a file over the annotation size limit, refused unread: `dataprep.sources.read_annotation_file`)."""
    p = Path(path)
    raw = read_annotation_file(p, option, fix)
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"--{option}: {p} is not valid JSON ({err}); {fix}") from err
    except RecursionError:  # hostile nesting: refused, not a crash
        raise InputError(f"--{option}: {p} nests JSON deeper than any annotation file does (refused); {fix}") from None
    return data, InputFile(option=option, name=p.name, sha256=hashlib.sha256(raw).hexdigest())


def require_keys(data: Any, keys: list[str], path: str | Path, option: str, fix: str) -> None:
    if not isinstance(data, dict) or any(k not in data for k in keys):
        have = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise InputError(f"--{option}: {path} lacks top-level keys {keys} (has {have}); {fix}")


def read_image(tree: FileTree, name: str, options: ConvertOptions) -> tuple[bytes, ImageInfo]:
    data = tree.read(name)
    info = inspect_image(data, max_pixels=options.max_pixels, verify=options.verify)  # type: ignore[arg-type]
    return data, info


def image_model(data: bytes, info: ImageInfo, file_name: str, expect_hw: tuple[int, int] | None) -> Image:
    """The record's Image, checking the header against the size the annotations declare."""
    if expect_hw is not None and (info.height, info.width) != tuple(expect_hw):
        raise RecordRejected(
            "size_mismatch",
            f"image {file_name} is {info.width}x{info.height} but the annotations say "
            f"{expect_hw[1]}x{expect_hw[0]}; the image or the annotation file is from another release",
        )
    return Image(
        ext=info.ext,
        sha256=hashlib.sha256(data).hexdigest(),
        bytes=len(data),
        width=info.width,
        height=info.height,
        file_name=file_name,
    )


@contextmanager
def blamed_on(name: str, what: str) -> Iterator[None]:
    """A `RecordRejected` raised inside is about the file `name` (a mask, a label map), not the record's
    image: its quarantine row names that file as `source_file` and its message starts with `WHAT NAME: `."""
    try:
        yield
    except RecordRejected as err:
        raise RecordRejected(err.reason, f"{what} {name}: {err.message}", source_file=str(name)) from None


def estimate_bytes(tree: FileTree, name: str) -> int:
    """Planning estimate of a record's shard bytes: its image size plus a JSON/header margin."""
    try:
        size = tree.size(name)
    except RecordRejected:
        size = None
    return (size or 0) + 8192


@functools.lru_cache(maxsize=16)
def cached_tree(path: str, option: str) -> FileTree:
    """One open tree per input and worker process: a zip's directory or a tar's index is read once,
    not once per record (Ray reuses worker processes across tasks)."""
    return open_tree(path, option=option)
