"""Dataset storage: a local folder or an `s3://bucket/prefix`, written atomically.

Every file lands under its final name only when complete: local files are written to a temporary
name, fsynced, then renamed (and the folder fsynced); S3 objects are uploaded to a temporary key,
server-side copied to the final key, then the temporary key is deleted. A reader therefore never
sees a half-written shard, and `manifest.parquet` (written last) marks a complete dataset.

S3 endpoint and credentials come only from the standard AWS environment (`AWS_ENDPOINT_URL_S3` or
`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`), which
boto3 reads itself: nothing secret ever passes through our arguments or logs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20


def sha256_file(fileobj: BinaryIO) -> str:
    digest = hashlib.sha256()
    for block in iter(lambda: fileobj.read(CHUNK), b""):
        digest.update(block)
    return digest.hexdigest()


class Storage(ABC):
    """Relative-path file store rooted at `url`. Paths use '/' separators."""

    url: str

    @abstractmethod
    def put_bytes(self, rel: str, data: bytes) -> None:
        """Atomically write `data` at `rel`."""

    @abstractmethod
    def put_file(self, rel: str, local: Path) -> None:
        """Atomically publish the local file `local` at `rel` (the local file is consumed)."""

    @abstractmethod
    def get_bytes(self, rel: str) -> bytes: ...

    @abstractmethod
    def open_read(self, rel: str) -> BinaryIO:
        """A readable binary stream of `rel` (caller closes it)."""

    @abstractmethod
    def exists(self, rel: str) -> bool: ...

    @abstractmethod
    def size(self, rel: str) -> int | None: ...

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Relative paths of all files under `prefix` (recursive), sorted."""

    @abstractmethod
    def delete(self, rel: str) -> None: ...

    def delete_prefix(self, prefix: str) -> None:
        for rel in self.list(prefix):
            self.delete(rel)

    def cleanup_temporaries(self) -> int:
        """Remove temporary files a killed writer left behind; returns how many."""
        return 0

    def sha256(self, rel: str) -> str | None:
        """sha256 of the stored bytes (read back, not trusted from metadata), None when absent."""
        if not self.exists(rel):
            return None
        with self.open_read(rel) as stream:
            return sha256_file(stream)

    def scratch_dir(self) -> Path:
        """A local folder for temporary files that `put_file` consumes cheaply."""
        return Path(tempfile.gettempdir())

    def describe(self, rel: str = "") -> str:
        return f"{self.url.rstrip('/')}/{rel}" if rel else self.url

    def local_path(self, rel: str) -> Path | None:
        """The file's path when it is on a local file system (readers seek in it), else None."""
        return None


class LocalStorage(Storage):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).absolute()
        self.url = str(self.root)

    def _path(self, rel: str) -> Path:
        return self.root / rel

    def _tmp_for(self, final: Path) -> Path:
        return final.with_name(f".tmp-{final.name}-{uuid.uuid4().hex}")

    @staticmethod
    def _fsync_dir(folder: Path) -> None:
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def put_bytes(self, rel: str, data: bytes) -> None:
        final = self._path(rel)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._tmp_for(final)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        self._fsync_dir(final.parent)

    def put_file(self, rel: str, local: Path) -> None:
        final = self._path(rel)
        final.parent.mkdir(parents=True, exist_ok=True)
        with open(local, "rb+") as f:
            os.fsync(f.fileno())
        try:
            os.replace(local, final)  # same file system: atomic rename
        except OSError:
            tmp = self._tmp_for(final)
            shutil.copyfile(local, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, final)
            local.unlink()
        self._fsync_dir(final.parent)

    def get_bytes(self, rel: str) -> bytes:
        return self._path(rel).read_bytes()

    def local_path(self, rel: str) -> Path | None:
        return self._path(rel)

    def open_read(self, rel: str) -> BinaryIO:
        return open(self._path(rel), "rb")

    def exists(self, rel: str) -> bool:
        return self._path(rel).is_file()

    def size(self, rel: str) -> int | None:
        path = self._path(rel)
        return path.stat().st_size if path.is_file() else None

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.exists():
            return []
        if base.is_file():
            return [prefix]
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file())

    def delete(self, rel: str) -> None:
        self._path(rel).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self._path(prefix), ignore_errors=True)

    def cleanup_temporaries(self) -> int:
        removed = 0
        if self.root.is_dir():
            for path in self.root.rglob(".tmp-*"):
                if path.is_file():
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed

    def scratch_dir(self) -> Path:
        # inside the output root, so that put_file is a rename on the same file system
        scratch = self.root / "_work" / "tmp"
        scratch.mkdir(parents=True, exist_ok=True)
        return scratch


class S3Storage(Storage):
    def __init__(self, url: str) -> None:
        import boto3  # imported here: local-only users never pay for it

        without = url[len("s3://") :]
        bucket, _, prefix = without.partition("/")
        if not bucket:
            raise ValueError(f"S3 url {url!r} has no bucket; use s3://BUCKET/PREFIX")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        from botocore.config import Config

        # endpoint (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL) and credentials: from the environment;
        # throttling and dropped connections are retried with backoff ("standard" mode)
        self.client = boto3.client("s3", config=Config(retries={"max_attempts": 8, "mode": "standard"}))

    def __getstate__(self) -> dict:
        return {"url": self.url}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["url"])

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _tmp_key(self, rel: str) -> str:
        return self._key(f"_work/tmp/{rel.replace('/', '__')}-{uuid.uuid4().hex}")

    def _publish(self, tmp_key: str, rel: str) -> None:
        self.client.copy({"Bucket": self.bucket, "Key": tmp_key}, self.bucket, self._key(rel))
        self.client.delete_object(Bucket=self.bucket, Key=tmp_key)

    def put_bytes(self, rel: str, data: bytes) -> None:
        tmp_key = self._tmp_key(rel)
        self.client.put_object(Bucket=self.bucket, Key=tmp_key, Body=data)
        self._publish(tmp_key, rel)

    def put_file(self, rel: str, local: Path) -> None:
        tmp_key = self._tmp_key(rel)
        self.client.upload_file(str(local), self.bucket, tmp_key)
        self._publish(tmp_key, rel)
        local.unlink(missing_ok=True)

    def get_bytes(self, rel: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self._key(rel))["Body"].read()

    def open_read(self, rel: str) -> BinaryIO:
        return self.client.get_object(Bucket=self.bucket, Key=self._key(rel))["Body"]

    def exists(self, rel: str) -> bool:
        return self.size(rel) is not None

    def size(self, rel: str) -> int | None:
        from botocore.exceptions import ClientError

        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._key(rel))["ContentLength"])
        except ClientError as err:
            if err.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def list(self, prefix: str) -> list[str]:
        full = self._key(prefix)
        strip = f"{self.prefix}/" if self.prefix else ""
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            for obj in page.get("Contents", []):
                out.append(obj["Key"][len(strip) :])
        return sorted(out)

    def delete(self, rel: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(rel))


def open_storage(url: str | Path) -> Storage:
    """`s3://bucket/prefix` -> S3Storage; anything else is a local folder."""
    text = str(url)
    if text.startswith("s3://"):
        return S3Storage(text)
    if "://" in text:
        raise ValueError(f"unsupported storage url {text!r}: use a local folder or s3://bucket/prefix")
    return LocalStorage(text)
