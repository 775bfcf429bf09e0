"""Read upstream image/mask files from a folder or, in place, from a .zip / .tar archive.

Corpora are published as archives (COCO's val2017.zip, panoptic_val2017.zip, ADE20K's zip); the
converter reads members straight out of them instead of extracting, which saves the disk space and
time of an extraction and, more importantly, never writes attacker-controlled paths to disk.

`open_tree(path)` returns a `FileTree`:

- `FolderTree`: `root/name` on disk;
- `ZipTree`: members of a .zip, read with `zipfile`;
- `TarTree`: members of a .tar (random access by seeking to each member's data) or of a compressed
  .tar.gz / .tgz / .tar.bz2 / .tar.xz (no random access, see `TarTree`).

Names are the file names found in the annotations ("000000439180.jpg" or
"val2017/000000439180.jpg"). In an archive a name matches a member under the archive's single
top-level folder (val2017.zip holds val2017/*.jpg; panoptic_val2017.zip holds panoptic_val2017/*.png)
or the member of exactly that name. `names()` lists names relative to that content root, so a folder
and the archive of that folder list the same names.

Safety (every refusal is a `RecordRejected`, so the record is quarantined and the run goes on):

- a requested name that is absolute or has a '..' component -> `unsafe_path` (`UnsafeName`);
- in a folder, a path whose real path leaves the root (a symlink pointing outside) -> `unsafe_path`;
- an archive member that is a symlink, hard link, device, FIFO or directory, or whose own name is
  absolute or has a '..' component -> `unsafe_path` when requested, absent from `names()`; links are
  never followed and nothing is ever extracted to disk;
- a name that is not there -> `missing_file` (`MissingFile`), naming the tree;
- a file larger than `MAX_RECORD_FILE_BYTES` (1 GiB; by its size on disk or the size an archive
  member declares, before anything is read or decompressed) -> `file_too_large`: no upstream image,
  mask or per-image annotation comes near it, and reading it whole would cost that much memory in
  every worker.

Whole annotation inputs (a COCO JSON, a refs pickle) are read by `read_annotation_file`, which
refuses a file over `max_annotation_bytes()` before reading it, with an `InputError` naming the
file, its size, the limit and how to raise it (`XSAM_MAX_ANNOTATION_BYTES`).

Trees are picklable and cheap to ship to a Ray task: `__getstate__` drops open file handles (they are
re-opened lazily in the worker and cached per instance; not thread-safe, workers are processes).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import stat
import tarfile
import zipfile
import zlib
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from dataprep.quarantine import InputError, RecordRejected

__all__ = [
    "MAX_RECORD_FILE_BYTES",
    "ArchiveEntry",
    "FileTree",
    "FolderTree",
    "MissingFile",
    "TarTree",
    "UnsafeName",
    "ZipTree",
    "max_annotation_bytes",
    "open_tree",
    "read_annotation_file",
]

EntryKind = Literal["file", "dir", "symlink", "hardlink", "device", "fifo", "other", "unsafe_name"]


# One file of a record (image, mask, per-image annotation): refused above this, before reading.
MAX_RECORD_FILE_BYTES = 1 << 30
# A whole annotation input is parsed in the driver's memory (Python objects take several times the
# file's size). The largest upstream file X-SAM reads, LLaVA-665K's JSON, is about 1.0 GB.
MAX_ANNOTATION_BYTES_ENV = "XSAM_MAX_ANNOTATION_BYTES"
DEFAULT_MAX_ANNOTATION_BYTES = 3 << 29  # 1.5 GiB


def max_annotation_bytes() -> int:
    """The size limit of a whole annotation input: `XSAM_MAX_ANNOTATION_BYTES`, else 1.5 GiB."""
    raw = os.environ.get(MAX_ANNOTATION_BYTES_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_ANNOTATION_BYTES
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = 0
    if value <= 0:
        raise InputError(f"{MAX_ANNOTATION_BYTES_ENV}={raw!r} is not a positive number of bytes; "
                         "set it to e.g. 4000000000 or unset it for the default (1.5 GiB)")
    return value


def read_annotation_file(path: str | Path, option: str, fix: str) -> bytes:
    """The bytes of the annotation input at `path` (the CLI option `option`); `InputError` naming the
    file and `fix` when it is missing or not a regular file, and, before anything is read, when it is
    larger than `max_annotation_bytes()`."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        st = None
    if st is None or not stat.S_ISREG(st.st_mode):
        raise InputError(f"--{option}: file not found: {p}; {fix}")
    limit = max_annotation_bytes()
    if st.st_size > limit:
        raise InputError(
            f"--{option}: {p} is {st.st_size:,} bytes, more than the {limit:,}-byte limit for an annotation "
            f"file (it is parsed whole in memory; the largest upstream file is about 1.0 GB); refused before "
            f"reading it. If the file is genuine, raise the limit: {MAX_ANNOTATION_BYTES_ENV}=BYTES; "
            f"otherwise {fix}"
        )
    with open(p, "rb") as f:
        raw = f.read(limit + 1)  # a file that grew since stat() is still bounded
    if len(raw) > limit:
        raise InputError(f"--{option}: {p} grew past the {limit:,}-byte limit while being read; refused")
    return raw


def _too_large(name: str, where: str, size: int) -> RecordRejected:
    return RecordRejected(
        "file_too_large",
        f"{name!r} in {where} is {size:,} bytes, more than the {MAX_RECORD_FILE_BYTES:,}-byte cap for one file "
        "of a record; refused before reading (no upstream image, mask or per-image annotation is that "
        "large: the file is damaged or not what the annotations name)",
    )


class UnsafeName(RecordRejected):
    """A name or member escapes its tree ('..', absolute) or is a link/device/dir: `unsafe_path`."""

    def __init__(self, message: str) -> None:
        super().__init__("unsafe_path", message)


class MissingFile(RecordRejected):
    """The name is not in the tree: `missing_file`."""

    def __init__(self, message: str) -> None:
        super().__init__("missing_file", message)


def _split(name: str) -> list[str]:
    """Components of a '/'- or '\\'-separated name, without empty and '.' components."""
    # Backslashes count as separators so that a Windows-made archive cannot hide a '..' in them.
    return [c for c in name.replace("\\", "/").split("/") if c not in ("", ".")]


def _is_unsafe(name: str) -> str | None:
    """Why `name` may escape its tree, or None when it is a plain relative path."""
    if "\x00" in name:
        return "contains a NUL byte"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: a non-UTF-8 name smuggled through a JSON escape
        return "is not valid UTF-8"
    if name.startswith(("/", "\\")):
        return "is absolute"
    if len(name) >= 2 and name[1] == ":" and name[0].isalpha():
        return "starts with a drive letter (absolute Windows path)"
    if ".." in _split(name):
        return "has a '..' component"
    return None


def _clean_request(name: str, root: str) -> str:
    """Validate a requested name and return it normalised ('a/./b' -> 'a/b'); raise UnsafeName."""
    if not isinstance(name, str):
        raise TypeError(f"file name must be a str, got {type(name).__name__}")
    why = _is_unsafe(name)
    if why is not None:
        raise UnsafeName(
            f"file name {name!r} {why}; names from the annotations must be relative paths inside "
            f"{root} (refused, nothing was read)"
        )
    parts = _split(name)
    if not parts:
        raise MissingFile(f"empty file name requested from {root}")
    return "/".join(parts)


@dataclass(frozen=True, slots=True)
class ArchiveEntry:
    """One member of an archive index, in archive order."""

    name: str  # normalised member name ('./a/b.jpg' -> 'a/b.jpg'); raw name if unsafe
    kind: EntryKind  # only "file" entries can be read
    size: int  # bytes (the logical size for sparse tar members)


class FileTree(ABC):
    """A folder or an archive of upstream files, read by relative name."""

    root: str  # the folder or archive path, as given; named in every message

    def __init__(self, root: str | Path) -> None:
        self.root = str(root)

    @abstractmethod
    def read(self, name: str) -> bytes:
        """The bytes of file `name`; raise `UnsafeName` / `MissingFile` (both `RecordRejected`)."""

    @abstractmethod
    def size(self, name: str) -> int | None:
        """The size in bytes of file `name`, None when missing; raise `UnsafeName` when unsafe."""

    @abstractmethod
    def names(self) -> list[str]:
        """Sorted relative names of the readable regular files."""

    def close(self) -> None:
        """Close cached handles (they reopen lazily on the next read)."""

    def __enter__(self) -> FileTree:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root!r})"

    # Subclasses list the attributes holding open handles or per-process caches.
    _transient: tuple[str, ...] = ()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for attr in self._transient:
            state[attr] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


class FolderTree(FileTree):
    """Files under a folder on disk: `root/name`, never leaving the root's real path."""

    _transient = ("_real_root",)

    def __init__(self, root: str | Path) -> None:
        super().__init__(root)
        # Resolved lazily (and again after unpickling): a worker may see the mount under another
        # real path than the driver.
        self._real_root: str | None = None

    def _root_real(self) -> str:
        if self._real_root is None:
            self._real_root = os.path.realpath(self.root)
        return self._real_root

    def _resolve(self, name: str) -> tuple[str, os.stat_result] | None:
        """(real path, stat) of a regular file `name`, None if missing; raise UnsafeName."""
        clean = _clean_request(name, self.root)
        root = self._root_real()
        real = os.path.realpath(os.path.join(root, clean))
        if real != root and not real.startswith(root.rstrip(os.sep) + os.sep):
            raise UnsafeName(
                f"{name!r} in folder {self.root} resolves to {real}, outside the folder (a symlink "
                "pointing out of it); refused"
            )
        try:
            st = os.stat(real)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:  # permission denied, symlink loop, I/O error
            raise MissingFile(f"{name!r} in folder {self.root} cannot be read: {exc}") from exc
        if stat.S_ISDIR(st.st_mode):
            return None
        if not stat.S_ISREG(st.st_mode):
            # Reading a FIFO would block forever, a device could be endless.
            raise UnsafeName(
                f"{name!r} in folder {self.root} is not a regular file (device, FIFO or socket); "
                "refused"
            )
        return real, st

    def read(self, name: str) -> bytes:
        found = self._resolve(name)
        if found is None:
            raise MissingFile(f"{name!r} is not in folder {self.root} (looked for a regular file)")
        if found[1].st_size > MAX_RECORD_FILE_BYTES:
            raise _too_large(name, f"folder {self.root}", found[1].st_size)
        # Open the already-resolved real path so a symlink swapped in after the check is not used.
        try:
            with open(found[0], "rb") as f:
                data = f.read(MAX_RECORD_FILE_BYTES + 1)
        except OSError as exc:  # removed or made unreadable since the check
            raise MissingFile(f"{name!r} in folder {self.root} cannot be read: {exc}") from exc
        if len(data) > MAX_RECORD_FILE_BYTES:  # grew since the check
            raise _too_large(name, f"folder {self.root}", len(data))
        return data

    def size(self, name: str) -> int | None:
        found = self._resolve(name)
        return None if found is None else found[1].st_size

    def names(self) -> list[str]:
        root = self._root_real()
        prefix = root.rstrip(os.sep) + os.sep
        out: list[str] = []
        # followlinks=False: a symlinked folder could loop or lead outside; symlinked files are
        # listed only when they resolve to a regular file inside the root.
        for dirpath, _dirs, files in os.walk(root, followlinks=False):
            for fname in files:
                path = os.path.join(dirpath, fname)
                real = os.path.realpath(path)
                if not real.startswith(prefix):
                    continue
                try:
                    if not stat.S_ISREG(os.stat(real).st_mode):
                        continue
                except OSError:
                    continue  # dangling symlink
                out.append(os.path.relpath(path, root).replace(os.sep, "/"))
        out.sort()
        return out


class _ArchiveTree(FileTree):
    """Shared name resolution of zip and tar trees over an index name -> entry."""

    def __init__(self, root: str | Path) -> None:
        super().__init__(root)
        self._index: dict[str, Any] | None = None  # normalised member name -> entry
        self._order: list[ArchiveEntry] | None = None
        self._prefix = ""  # "top/" when every member lives under one top-level folder

    @abstractmethod
    def _build_index(self) -> list[tuple[ArchiveEntry, Any]]:
        """(entry, reader-specific locator) for every member, in archive order."""

    def _ensure_index(self) -> dict[str, Any]:
        if self._index is None:
            pairs = self._build_index()
            index: dict[str, Any] = {}
            pairs = [(e, loc) for e, loc in pairs if e.name]  # drop the './' root entry
            for entry, loc in pairs:
                index[entry.name] = (entry, loc)  # a later duplicate wins, as on extraction
            self._order = [e for e, _ in pairs]
            self._index = index
            self._prefix = _single_top_folder(e for e, _ in pairs)
        return self._index

    def index_entries(self) -> list[ArchiveEntry]:
        """Every member in archive order (builds the index once per instance).

        For a compressed tar, reading files in this order is one sequential pass.
        """
        self._ensure_index()
        assert self._order is not None
        return list(self._order)

    def _lookup(self, name: str) -> tuple[ArchiveEntry, Any] | None:
        clean = _clean_request(name, self.root)
        index = self._ensure_index()
        # Under the single top-level folder first, consistent with names() being relative to it.
        found = index.get(self._prefix + clean) if self._prefix else None
        if found is None:
            found = index.get(clean)
        if found is None:
            return None
        entry = found[0]
        if entry.kind != "file":
            what = {
                "dir": "a directory",
                "symlink": "a symbolic link",
                "hardlink": "a hard link",
                "device": "a device file",
                "fifo": "a FIFO",
                "unsafe_name": "a member with an unsafe name",
            }.get(entry.kind, f"a non-regular member ({entry.kind})")
            raise UnsafeName(
                f"{name!r} is {what} in archive {self.root} (member {entry.name!r}); links and "
                "special members are never followed or extracted"
            )
        return found

    def _missing(self, name: str) -> MissingFile:
        where = f" (also looked under its top-level folder {self._prefix!r})" if self._prefix else ""
        return MissingFile(f"{name!r} is not in archive {self.root}{where}")

    def size(self, name: str) -> int | None:
        found = self._lookup(name)
        return None if found is None else found[0].size

    def read(self, name: str) -> bytes:
        found = self._lookup(name)
        if found is None:
            raise self._missing(name)
        if found[0].size > MAX_RECORD_FILE_BYTES:  # the declared size: nothing read or inflated yet
            raise _too_large(name, f"archive {self.root} (member {found[0].name!r})", found[0].size)
        return self._read_entry(found[0], found[1])

    @abstractmethod
    def _read_entry(self, entry: ArchiveEntry, loc: Any) -> bytes: ...

    def names(self) -> list[str]:
        index = self._ensure_index()
        cut = len(self._prefix)
        return sorted(n[cut:] for n, (e, _) in index.items() if e.kind == "file")


def _single_top_folder(entries: Iterable[ArchiveEntry]) -> str:
    """'top/' when all safe members are below one top-level folder, else ''."""
    top: str | None = None
    for e in entries:
        if e.kind == "unsafe_name" or not e.name:
            continue  # can never be requested; must not hide the layout of the rest
        head, sep, rest = e.name.partition("/")
        if not sep or not rest:
            if e.kind == "dir" and (top is None or top == head):
                top = head  # the folder's own entry ("val2017/")
                continue
            return ""  # a file (or link) at the top level
        if top is None:
            top = head
        elif head != top:
            return ""
    return f"{top}/" if top else ""


def _member_name(raw: str) -> tuple[str, bool]:
    """(normalised name, safe?) of an archive member's own name."""
    if _is_unsafe(raw) is not None:
        return raw, False
    return "/".join(_split(raw)), True


class ZipTree(_ArchiveTree):
    """Members of a .zip archive, read in place with `zipfile` (random access by design)."""

    # The index is dropped too: it is rebuilt from the central directory, which ZipFile reads on
    # opening anyway, so shipping it would only make the pickle bigger.
    _transient = ("_zip", "_index", "_order")

    def __init__(self, root: str | Path) -> None:
        super().__init__(root)
        self._zip: zipfile.ZipFile | None = None

    def _handle(self) -> zipfile.ZipFile:
        if self._zip is None:
            try:
                self._zip = zipfile.ZipFile(self.root)
            except (zipfile.BadZipFile, OSError) as exc:
                raise InputError(
                    f"cannot read zip archive {self.root}: {exc}; re-download it or pass the "
                    "extracted folder"
                ) from exc
        return self._zip

    def _build_index(self) -> list[tuple[ArchiveEntry, Any]]:
        out: list[tuple[ArchiveEntry, Any]] = []
        for info in self._handle().infolist():
            name, safe = _member_name(info.filename)
            mode = info.external_attr >> 16  # unix st_mode when made on unix, else 0
            kind: EntryKind
            if not safe:
                kind = "unsafe_name"
            elif info.is_dir():
                kind = "dir"
            elif stat.S_ISLNK(mode):
                kind = "symlink"  # the member's data is the link target: never follow it
            elif stat.S_IFMT(mode) not in (0, stat.S_IFREG):
                kind = "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "other"
            else:
                kind = "file"
            out.append((ArchiveEntry(name, kind, info.file_size), info))
        return out

    def _read_entry(self, entry: ArchiveEntry, loc: Any) -> bytes:
        try:
            return self._handle().read(loc)  # the exact ZipInfo: duplicates resolve as indexed
        except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError) as exc:
            # Bad CRC, truncated/garbled member, encrypted member, unknown compression.
            raise RecordRejected(
                "corrupt_image",
                f"member {entry.name!r} of zip archive {self.root} cannot be read: "
                f"{type(exc).__name__}: {exc}; re-download the archive",
            ) from exc

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None


_TAR_COMPRESSION: dict[str, str] = {
    ".tar": "",
    ".tar.gz": "gz",
    ".tgz": "gz",
    ".tar.bz2": "bz2",
    ".tbz2": "bz2",
    ".tar.xz": "xz",
    ".txz": "xz",
}

class TarTree(_ArchiveTree):
    """Members of a tar archive, read in place by seeking; never extracted.

    The member index (name -> data offset, size, type) is built once per instance by one pass over
    the headers and is kept when the tree is pickled, so a worker reads exactly what the driver
    indexed without a re-scan (the archive's size and mtime are checked to catch a changed file).
    It costs about 100 bytes per member in the pickle: `ray.put` the tree once and hand the
    reference to the tasks.

    Plain .tar: the index pass only reads the 512-byte headers (it seeks over the data) and every
    read is one seek + read, so reading is random access.

    Compressed tar (.tar.gz, .tgz, .tar.bz2, .tar.xz): the stream has no random access. The index
    pass decompresses the whole archive once. Reads go through a cached decompressing stream:
    reading members in archive order (`index_entries()`) is one sequential pass overall, but a read
    that goes backwards restarts decompression from the start of the archive, so random-order reads
    cost O(archive) each. Recompress as .tar or .zip, or extract, for random access at scale.
    """

    _transient = ("_raw",)

    def __init__(self, root: str | Path, compression: str = "") -> None:
        super().__init__(root)
        if compression not in ("", "gz", "bz2", "xz"):
            raise ValueError(f"unknown tar compression {compression!r}")
        self.compression = compression
        self._raw: IO[bytes] | None = None
        self._stamp: tuple[int, int] | None = None  # (size, mtime_ns) when indexed

    def _stat_stamp(self) -> tuple[int, int]:
        try:
            st = os.stat(self.root)
        except OSError as exc:
            raise InputError(f"cannot read tar archive {self.root}: {exc}") from exc
        return st.st_size, st.st_mtime_ns

    def _handle(self) -> IO[bytes]:
        """The (decompressed) tar byte stream, opened once per instance/process."""
        if self._raw is None:
            if self._stamp is not None and self._stat_stamp() != self._stamp:
                raise InputError(
                    f"tar archive {self.root} changed since its member index was built "
                    "(size or mtime differ); restart the conversion"
                )
            try:
                if self.compression == "gz":
                    self._raw = gzip.open(self.root, "rb")
                elif self.compression == "bz2":
                    self._raw = bz2.open(self.root, "rb")
                elif self.compression == "xz":
                    self._raw = lzma.open(self.root, "rb")
                else:
                    self._raw = open(self.root, "rb")
            except OSError as exc:
                raise InputError(f"cannot open tar archive {self.root}: {exc}") from exc
        return self._raw

    def _build_index(self) -> list[tuple[ArchiveEntry, Any]]:
        stamp = self._stat_stamp()
        raw = self._handle()
        raw.seek(0)
        out: list[tuple[ArchiveEntry, Any]] = []
        try:
            # mode "r:" on the (decompressed) stream: tarfile seeks over member data, which on a
            # plain file skips it without reading and on a compressed stream decompresses forward.
            with tarfile.open(fileobj=raw, mode="r:") as tf:
                for m in tf:
                    name, safe = _member_name(m.name)
                    kind: EntryKind
                    if not safe:
                        kind = "unsafe_name"
                    elif m.issym():
                        kind = "symlink"
                    elif m.islnk():
                        kind = "hardlink"
                    elif m.isdir():
                        kind = "dir"
                    elif m.ischr() or m.isblk():
                        kind = "device"
                    elif m.isfifo():
                        kind = "fifo"
                    elif m.isreg():  # includes contiguous and GNU sparse files
                        kind = "file"
                    else:
                        kind = "other"
                    sparse = tuple((int(o), int(n)) for o, n in m.sparse) if m.sparse else None
                    out.append((ArchiveEntry(name, kind, m.size), (m.offset_data, sparse)))
        except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
            raise InputError(
                f"cannot index tar archive {self.root}: {type(exc).__name__}: {exc}; the archive "
                "is damaged or truncated, re-download it"
            ) from exc
        self._stamp = stamp
        return out

    def _read_at(self, offset: int, n: int, entry: ArchiveEntry) -> bytes:
        raw = self._handle()
        try:
            raw.seek(offset)
            data = raw.read(n)
        except (EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
            raise RecordRejected(
                "truncated_image",
                f"member {entry.name!r} of tar archive {self.root} cannot be read: "
                f"{type(exc).__name__}: {exc}; re-download the archive",
            ) from exc
        if len(data) != n:
            raise RecordRejected(
                "truncated_image",
                f"member {entry.name!r} of tar archive {self.root} is cut: {len(data)} of {n} "
                "bytes at its data offset; the archive is truncated, re-download it",
            )
        return data

    def _read_entry(self, entry: ArchiveEntry, loc: Any) -> bytes:
        offset, sparse = loc
        if sparse is None:
            return self._read_at(offset, entry.size, entry)
        # GNU/PAX sparse member: the stored data blocks are packed back to back from `offset`;
        # the sparse map says where each lands in the logical file, holes are zeros.
        out = bytearray(entry.size)
        pos = offset
        for start, count in sparse:
            if start + count > entry.size:
                raise RecordRejected(
                    "corrupt_image",
                    f"sparse member {entry.name!r} of tar archive {self.root} has a block beyond "
                    "its size; re-download the archive",
                )
            out[start : start + count] = self._read_at(pos, count, entry)
            pos += count
        return bytes(out)

    def close(self) -> None:
        if self._raw is not None:
            self._raw.close()
            self._raw = None


def _archive_kind(path: Path) -> tuple[str, str] | None:
    """('zip', '') or ('tar', compression) from the file name, None if not an archive name."""
    lower = path.name.lower()
    if lower.endswith(".zip"):
        return "zip", ""
    # Longest suffix first so '.tar.gz' is not taken for '.gz'.
    for suffix in sorted(_TAR_COMPRESSION, key=len, reverse=True):
        if lower.endswith(suffix):
            return "tar", _TAR_COMPRESSION[suffix]
    return None


def open_tree(path: str | Path, *, option: str = "input", hint: str | None = None) -> FileTree:
    """Open a folder or a .zip / .tar / .tar.gz / .tgz (/ .tar.bz2 / .tar.xz) archive as a tree.

    `option` and `hint` only shape the error message: e.g. option="--images", hint="pass the COCO
    val2017 folder or val2017.zip". Raise `InputError` (stop the run) when the path does not exist,
    is not a supported archive, or the archive cannot be opened.
    """
    p = Path(path)
    fix = hint or "pass a folder or a .zip, .tar, .tar.gz or .tgz archive"
    if p.is_dir():
        return FolderTree(p)
    if not p.exists():
        raise InputError(f"{option}: folder or archive not found: {p}; {fix}")
    kind = _archive_kind(p)
    if kind is None or not p.is_file():
        raise InputError(
            f"{option}: {p} is neither a folder nor a .zip/.tar/.tar.gz/.tgz archive; {fix}"
        )
    if kind[0] == "zip":
        ztree = ZipTree(p)
        try:
            ztree._handle()  # fail fast on a file that is not a zip
        except InputError as exc:
            raise InputError(f"{option}: {exc}" + (f"; {hint}" if hint else "")) from exc
        return ztree
    ttree = TarTree(p, kind[1])
    # Check the first header now (cheap) so that a mislabelled file fails at startup; the full
    # index is built lazily on first use.
    raw = ttree._handle()
    try:
        raw.seek(0)
        head = raw.read(tarfile.BLOCKSIZE)
        tarfile.TarInfo.frombuf(head, tarfile.ENCODING, "surrogateescape")
    except tarfile.EOFHeaderError:
        pass  # an empty tar (only zero blocks) is valid
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as exc:
        ttree.close()
        raise InputError(
            f"{option}: {p} is not a readable tar archive ({type(exc).__name__}: {exc}); {fix}"
        ) from exc
    return ttree
