"""`xsam data diff`: what changed between two datasets, from their metadata files only (cheap).

Records are matched by key through `index.parquet`: a key only in NEW is *added*, only in OLD
*removed*; a key in both is *changed* when its sample (the sha256 of the `KEY.json` member) or its
image differs, else *unchanged*. Counts are broken down per task and split. From `dataset.json`
the parameters, inputs (annotation files and their sha256), schema/layout/converter versions and
corpus are compared, and the two version ids (sha256 of `manifest.parquet`) are reported.
"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

from xsam.data.manifest import INDEX, load_dataset, read_parquet
from xsam.data.storage import Storage

CATEGORIES = ("added", "removed", "changed", "unchanged")
# dataset.json fields compared as a whole (besides `parameters` and `inputs`, compared per entry)
META_FIELDS = ("schema_version", "layout_version", "corpus", "task", "converter", "splits")


class DiffInputError(Exception):
    """One of the two datasets cannot be read (not a complete dataset, unreadable files)."""


def _load(storage: Storage, label: str) -> tuple[Any, list[dict[str, Any]]]:
    try:
        files = load_dataset(storage)
        index = read_parquet(storage, INDEX)
    except Exception as err:  # FileNotFoundError, parquet/JSON errors, S3 client errors
        raise DiffInputError(f"{label} dataset {storage.url}: {type(err).__name__}: {err}") from err
    return files, index


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": leaf}; lists and scalars are leaves."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def _compare(old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"name": name, "old": old.get(name), "new": new.get(name)}
        for name in sorted(set(old) | set(new))
        if old.get(name) != new.get(name)
    ]


def _inputs(meta: dict[str, Any]) -> dict[str, Any]:
    """Input entries flattened by their option: {"annotations.name": ..., "annotations.sha256": ...}."""
    out: dict[str, Any] = {}
    for entry in meta.get("inputs", []):
        option = entry.get("option") or entry.get("name")
        out.update(_flatten({k: v for k, v in entry.items() if k != "option"}, f"{option}."))
    return out


def diff_datasets(old: Storage, new: Storage, *, max_keys: int | None = None) -> dict[str, Any]:
    """Compare two complete datasets; returns one JSON-able report.

    `keys` lists the keys of each category except `unchanged` (sorted; at most `max_keys` each when
    given, `keys_total` holds the full counts). Raises `DiffInputError` when a dataset is unreadable.
    """
    old_files, old_index = _load(old, "old")
    new_files, new_index = _load(new, "new")
    old_rows = {row["key"]: row for row in old_index}
    new_rows = {row["key"]: row for row in new_index}

    keys: dict[str, list[str]] = {c: [] for c in CATEGORIES}
    reasons: dict[str, list[str]] = {}
    by_group: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: dict.fromkeys(CATEGORIES, 0))
    for key in sorted(set(old_rows) | set(new_rows)):
        o, n = old_rows.get(key), new_rows.get(key)
        if o is None:
            category, row = "added", n
        elif n is None:
            category, row = "removed", o
        else:
            row = n
            what = [
                label
                for label, col in (("sample", "sample_sha256"), ("image", "image_sha256"))
                if o[col] != n[col]
            ]
            category = "changed" if what else "unchanged"
            if what:
                reasons[key] = what
        keys[category].append(key)
        by_group[(row["task"], row["split"])][category] += 1  # type: ignore[index]

    def cut(values: list[str]) -> list[str]:
        return values if max_keys is None else values[:max_keys]

    old_meta, new_meta = old_files.meta, new_files.meta
    return {
        "old": {
            "path": old.url,
            "version": old_files.version,
            "records": len(old_rows),
            "schema_version": old_meta.get("schema_version"),
        },
        "new": {
            "path": new.url,
            "version": new_files.version,
            "records": len(new_rows),
            "schema_version": new_meta.get("schema_version"),
        },
        "same_version": old_files.version == new_files.version,
        "counts": {c: len(keys[c]) for c in CATEGORIES},
        "by_task": [
            {"task": task, "split": split, **counts} for (task, split), counts in sorted(by_group.items())
        ],
        "keys": {c: cut(keys[c]) for c in CATEGORIES if c != "unchanged"},
        "changed_what": {k: reasons[k] for k in cut(keys["changed"])},
        "meta": _compare(
            _flatten({f: old_meta.get(f) for f in META_FIELDS}), _flatten({f: new_meta.get(f) for f in META_FIELDS})
        ),
        "parameters": _compare(_flatten(old_meta.get("parameters", {})), _flatten(new_meta.get("parameters", {}))),
        "inputs": _compare(_inputs(old_meta), _inputs(new_meta)),
        "duplicate_keys": {
            "old": len(old_index) - len(old_rows),
            "new": len(new_index) - len(new_rows),
        },
    }


def short(value: Any, width: int = 40) -> str:
    """A compact one-line rendering of a parameter/input value for the human table."""
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:16] + "…"  # a sha256
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= width else text[: width - 1] + "…"
