"""Dataset storage: a local folder or an `s3://bucket/prefix`, written atomically.

Every file lands under its final name only when complete: local files are written to a temporary
name, fsynced, then renamed (and the folder fsynced); S3 objects are uploaded to a temporary key,
server-side copied to the final key, then the temporary key is deleted. A reader therefore never
sees a half-written shard, and `manifest.parquet` (written last) marks a complete dataset.

S3 endpoint and credentials come only from the standard AWS environment (`AWS_ENDPOINT_URL_S3` or
`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`), which
boto3 reads itself: nothing secret ever passes through our arguments or logs.

S3 failures: boto3 retries throttling, 5xx answers and dropped connections with backoff up to the
answer's headers; a download cut mid-body (which boto3 does not retry) is resumed from the byte it
stopped at with a Range request pinned to the object's ETag (`_ResumingBody`). A key that is not
there is a `FileNotFoundError` naming its URI, as for a local file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import BinaryIO

CHUNK = 1 << 20
STREAM_ATTEMPTS = 8  # reads of one download, each resuming where the last one was cut
log = logging.getLogger(__name__)


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
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)  # a failed write (a full disk) leaves nothing holding the space
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
            try:
                shutil.copyfile(local, tmp)
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)
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
        from botocore.exceptions import FlexibleChecksumError

        for attempt in (1, 2):
            try:
                with self.open_read(rel) as stream:
                    return stream.read()
            except FlexibleChecksumError as err:  # damaged in transit: the whole body again, once
                if attempt == 2:
                    raise OSError(f"{self.describe(rel)} arrived damaged twice: {err}") from err
                log.warning("%s arrived damaged (%s); reading it again", self.describe(rel), err)
        raise AssertionError("unreachable")

    def open_read(self, rel: str) -> BinaryIO:
        return _ResumingBody(self.client, self.bucket, self._key(rel), self.describe(rel))  # type: ignore[return-value]

    def exists(self, rel: str) -> bool:
        return self.size(rel) is not None

    def size(self, rel: str) -> int | None:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._key(rel))["ContentLength"])
        except Exception as err:
            if _missing(err):
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


def _missing(err: Exception) -> bool:
    from botocore.exceptions import ClientError

    code = err.response.get("Error", {}).get("Code") if isinstance(err, ClientError) else None
    return code in ("404", "NoSuchKey", "NotFound")


class _ResumingBody:
    """An S3 object's body that survives a connection cut mid-body: the next read asks for the rest
    (`Range: bytes=N-`, `If-Match: ETAG`, so a replaced object is an error rather than a splice),
    up to STREAM_ATTEMPTS times with backoff. `read(n)` returns n bytes unless the object ends.

    It replaces the `StreamingBody` that `get_object` returns, whose `with` block yields the raw
    urllib3 stream: read through that, a body cut mid-way simply ended early, unnoticed."""

    def __init__(self, client, bucket: str, key: str, where: str) -> None:  # noqa: ANN001 - a boto3 client
        self.client, self.bucket, self.key, self.where = client, bucket, key, where
        self.pos = 0  # bytes handed to the caller
        self.size = 0  # the object's length, from the answer
        self.etag: str | None = None
        self._body = self._open()

    def _open(self):  # noqa: ANN202
        kwargs = {"Range": f"bytes={self.pos}-", "IfMatch": self.etag} if self.etag else {}
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self.key, **kwargs)
        except Exception as err:
            if _missing(err):
                raise FileNotFoundError(f"{self.where} does not exist") from None
            raise
        self.etag = answer["ETag"]
        self.size = self.pos + int(answer["ContentLength"])
        return answer["Body"]

    def _read_once(self, amt: int) -> bytes:
        from botocore.exceptions import HTTPClientError, IncompleteReadError

        for attempt in range(1, STREAM_ATTEMPTS + 1):
            try:
                # botocore's own read (never the raw urllib3 stream its `with` hands out, which
                # returns a cut body short without a word): it checks the length and any checksum
                chunk = self._body.read(amt)
                if not chunk and amt and self.pos < self.size:
                    raise IncompleteReadError(actual_bytes=self.pos, expected_bytes=self.size)
                return chunk
            except (HTTPClientError, IncompleteReadError) as err:  # cut, reset or timed out mid-body
                self._body.close()
                if attempt == STREAM_ATTEMPTS:
                    raise OSError(f"reading {self.where} failed {attempt} times at byte {self.pos}: {err}") from err
                log.warning("reading %s was cut at byte %d (%s); asking for the rest", self.where, self.pos, err)
                time.sleep(min(0.1 * 2**attempt, 5.0))
                self._body = self._open()
        raise AssertionError("unreachable")

    def read(self, amt: int | None = -1) -> bytes:
        if amt is None or amt < 0:
            parts = []
            while chunk := self._read_once(CHUNK):
                parts.append(chunk)
                self.pos += len(chunk)
            return b"".join(parts)
        out = bytearray()
        while len(out) < amt:
            chunk = self._read_once(amt - len(out))
            if not chunk:
                break
            out += chunk
            self.pos += len(chunk)
        return bytes(out)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._body.close()

    def __enter__(self) -> _ResumingBody:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_storage(url: str | Path) -> Storage:
    """`s3://bucket/prefix` -> S3Storage; anything else is a local folder."""
    text = str(url)
    if text.startswith("s3://"):
        return S3Storage(text)
    if "://" in text:
        raise ValueError(f"unsupported storage url {text!r}: use a local folder or s3://bucket/prefix")
    return LocalStorage(text)
