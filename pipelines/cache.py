"""What a step's cache key is made of, and where a step's state lives.

- Input files and folders are fingerprinted by content: a file by its sha256, a folder by the
  sha256 of its sorted (relative name, sha256) list, an `s3://` prefix by its keys, sizes and
  ETags. Hashes are remembered by (path, size, mtime, inode) in a small SQLite file
  (`$XDG_CACHE_HOME/xsam/fingerprints.sqlite`), so a second look at an unchanged 18 GB image folder
  only stats it, and a folder rewritten with the same bytes keeps its fingerprint.
- The code version of a step is the package version plus the git tree hash of the package folders
  the step runs (`code_version`): computed from the files as git would hash them, so on a clean
  checkout it equals `git rev-parse HEAD:<package>`, and it works without git (in an image).
- A step's state (`StepStore`) is one JSON record per cache key under
  `STORAGE/pipelines/WORKFLOW/STEP/KEY.json`, next to the outputs: status (running, succeeded,
  failed), the inputs that made the key, the attempt, the Ray job, the result. A re-run reads it
  back, so the driver holds nothing that matters in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from importlib import metadata
from pathlib import Path
from typing import Any

from xsam.data.storage import open_storage

IGNORED_DIRS = {"__pycache__", ".git", ".pytest_cache", ".mypy_cache"}
IGNORED_SUFFIXES = (".pyc", ".pyo")


def digest(doc: Any) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------ fingerprints


class Fingerprints:
    """Content hashes of local files, remembered by stat in SQLite; folders and s3:// prefixes."""

    def __init__(self, path: Path | None = None) -> None:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        self.path = path or base / "xsam" / "fingerprints.sqlite"
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _conn(self) -> sqlite3.Connection | None:
        if self._db is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
                self._db.execute("CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, stat TEXT, sha256 TEXT)")
            except (OSError, sqlite3.Error):
                return None  # no cache: every file is hashed each time, still correct
        return self._db

    def file(self, path: Path) -> str:
        st = path.stat()
        stat = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
        key = str(path.resolve())
        with self._lock:
            db = self._conn()
            if db is not None:
                row = db.execute("SELECT stat, sha256 FROM files WHERE path = ?", (key,)).fetchone()
                if row and row[0] == stat:
                    return row[1]
        h = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                h.update(block)
        sha = h.hexdigest()
        with self._lock:
            db = self._conn()
            if db is not None:
                with db:
                    db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?)", (key, stat, sha))
        return sha

    def folder(self, root: Path) -> str:
        rows = []
        for folder, dirs, files in os.walk(root):
            dirs[:] = sorted(d for d in dirs if d not in IGNORED_DIRS)
            for name in sorted(files):
                path = Path(folder) / name
                rows.append((path.relative_to(root).as_posix(), self.file(path)))
        return digest(sorted(rows))

    @staticmethod
    def s3(url: str) -> str:
        import boto3

        bucket, _, prefix = url[len("s3://"):].partition("/")
        client = boto3.client("s3")
        rows = []
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            rows += [(o["Key"], o["Size"], o.get("ETag", "")) for o in page.get("Contents", [])]
        return digest(sorted(rows))

    def value(self, value: Any) -> dict[str, Any]:
        """What an input value is, for a cache key: a path's content, or the value itself."""
        if isinstance(value, str) and value.startswith("s3://"):
            return {"s3": value, "sha256": self.s3(value)}
        if isinstance(value, str) and value and Path(value).exists():
            path = Path(value)
            kind = "folder" if path.is_dir() else "file"
            return {kind: value, "sha256": self.folder(path) if path.is_dir() else self.file(path)}
        return {"value": value}


# ------------------------------------------------------------------------------------ code version


def _blob(path: Path) -> bytes:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).digest()


def git_tree_hash(root: Path) -> str:
    """The git tree hash of a folder's files (git's object format; caches and bytecode left out)."""

    def tree(folder: Path) -> bytes | None:
        entries = []
        for child in folder.iterdir():
            if child.is_symlink():
                target = os.readlink(child).encode()
                entries.append((child.name, b"120000", hashlib.sha1(b"blob %d\0" % len(target) + target).digest()))
            elif child.is_dir():
                if child.name in IGNORED_DIRS or child.name.endswith(".egg-info"):
                    continue
                sub = tree(child)
                if sub is not None:  # git has no empty trees
                    entries.append((child.name, b"40000", sub))
            elif not child.name.endswith(IGNORED_SUFFIXES):
                mode = b"100755" if os.access(child, os.X_OK) else b"100644"
                entries.append((child.name, mode, _blob(child)))
        if not entries:
            return None
        # git orders a tree's entries by name, a sub-tree's name compared as if it ended in '/'
        entries.sort(key=lambda e: e[0] + "/" if e[1] == b"40000" else e[0])
        body = b"".join(mode + b" " + name.encode() + b"\0" + sha for name, mode, sha in entries)
        return hashlib.sha1(b"tree %d\0" % len(body) + body).digest()

    found = tree(root)
    return found.hex() if found else hashlib.sha1(b"tree 0\0").hexdigest()


def package_dir(package: str) -> Path:
    import importlib

    return Path(importlib.import_module(package).__file__).parent


def code_version(packages: tuple[str, ...]) -> dict[str, Any]:
    """The package version and the git tree hash of each of `packages` (as imported here)."""
    try:
        version = metadata.version("xsam-pipeline")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {"version": version, "trees": {p: git_tree_hash(package_dir(p)) for p in packages}}


# ------------------------------------------------------------------------------------ step state


class StepStore:
    """`STORAGE/pipelines/WORKFLOW/`: `workflow.json` (the parent run) and `STEP/KEY.json` records."""

    def __init__(self, storage: str, workflow: str) -> None:
        self.url = f"{storage.rstrip('/')}/pipelines/{workflow}"
        self.storage = open_storage(self.url)

    def result_uri(self, step: str, key: str) -> str:
        return f"{self.url}/{step}/{key}.result.json"

    def read(self, step: str, key: str) -> dict[str, Any] | None:
        return self._read(f"{step}/{key}.json")

    def write(self, step: str, key: str, record: dict[str, Any]) -> None:
        self._write(f"{step}/{key}.json", record)
        self._write(f"{step}/latest.json", {"key": key})

    def latest(self, step: str) -> dict[str, Any] | None:
        pointer = self._read(f"{step}/latest.json")
        return self.read(step, pointer["key"]) if pointer else None

    def records(self, step: str) -> list[dict[str, Any]]:
        names = [r for r in self.storage.list(f"{step}/") if r.endswith(".json")
                 and not r.endswith((".result.json", "/latest.json"))]
        return [doc for doc in (self._read(r) for r in sorted(names)) if doc]

    def workflow_state(self) -> dict[str, Any] | None:
        return self._read("workflow.json")

    def set_workflow_state(self, doc: dict[str, Any]) -> None:
        self._write("workflow.json", doc)

    def _read(self, rel: str) -> dict[str, Any] | None:
        if not self.storage.exists(rel):
            return None
        return json.loads(self.storage.get_bytes(rel))

    def _write(self, rel: str, doc: dict[str, Any]) -> None:
        self.storage.put_bytes(rel, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8"))
