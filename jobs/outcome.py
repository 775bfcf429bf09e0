"""What a finished job reports, as one JSON file a caller can read back (`--result-json URI`).

`xsam data convert`, `xsam data lint`, `xsam train` and `xsam eval` write it when asked: the dataset
and its version (the manifest's sha256), the last checkpoint and its id, the scores and the MLflow
run. A workflow step reads it to learn its outputs without parsing logs, wherever the job ran: the
URI may be a local path or `s3://bucket/key` (the endpoint and credentials from the standard AWS
variables). The file is written once the work is done; a job that fails writes none.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from xsam.data.storage import open_storage


def _split(uri: str) -> tuple[str, str]:
    folder, _, name = str(uri).rstrip("/").rpartition("/")
    if not name:
        raise ValueError(f"--result-json {uri!r}: give a file path (local or s3://bucket/key.json)")
    return folder or ".", name


def write_result(uri: str, doc: dict[str, Any]) -> None:
    folder, name = _split(uri)
    open_storage(folder).put_bytes(name, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def read_result(uri: str) -> dict[str, Any] | None:
    """The result at `uri`, or None where there is none."""
    folder, name = _split(uri)
    storage = open_storage(folder)
    if not storage.exists(name):
        return None
    return json.loads(storage.get_bytes(name))


def dataset_version(dataset: str) -> str | None:
    """A dataset's version id (`xsam.data.manifest.version_id`: the sha256 of its manifest.parquet),
    or None where it has none (yet)."""
    from xsam.data.manifest import MANIFEST, version_id

    storage = open_storage(dataset)
    return version_id(storage) if storage.exists(MANIFEST) else None


def checkpoint_id(checkpoint: str) -> str | None:
    """A training checkpoint's id: the sha256 of its trainer.json (step, world, recipe, MLflow run),
    or None where the folder holds no checkpoint."""
    from jobs.train import TRAINER_STATE, RunStorage

    store = RunStorage.open(checkpoint)
    path = store.join(TRAINER_STATE)
    if not store.exists(path):
        return None
    with store.fs.open_input_stream(path) as stream:
        return hashlib.sha256(stream.read()).hexdigest()
