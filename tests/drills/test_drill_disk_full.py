"""Fault drill: the disk fills up while shards are written.

Issue 9: "Disk full while writing shards (a small tmpfs or a quota'd loop folder where available, else
an injected ENOSPC) -> clear error, no partial shard left with a final name, resume afterwards."

Two variants:
- injected ENOSPC, everywhere: the conversion runs in this process (`prepare`, `run_unit`), with the
  shard writer's `open` replaced by `_DiskWithFreeBytes.open`, which hands out real files that take
  `free` bytes in all and then fail with ENOSPC, as a full disk does (the bytes before land on disk).
  Only that one function is replaced; storage, publishing and the unit records are the real ones.
  The resume is the real CLI on the session's Ray.
- a real tmpfs, where `mount` is permitted (root on this box; skipped in a container without it):
  the real CLI on the session's Ray writes into a 1 MiB tmpfs until the kernel says ENOSPC; then the
  tmpfs is grown (`mount -o remount,size=...`, i.e. space freed) and the same command resumes.
Both assert one clear error naming the file and the fix, that every file under a final shard name
is complete (bytes equal to the reference's, hash equal to its unit record), and that the resumed
output is byte-identical to an uninterrupted conversion with nothing lost or duplicated.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from builders import build_panoptic, convert_local, dataset_files
from conftest import invoke_cli, run_cli

import dataprep.shard_writer as shard_writer
from dataprep.convert import ConvertParams, DiskFullError, prepare, run_unit
from dataprep.converters import get_converter
from xsam.data.manifest import INDEX, MANIFEST, read_parquet
from xsam.data.storage import open_storage

RECORDS = 12
SAMPLES_PER_SHARD = 3  # 4 units of ~0.7 MB shards


@pytest.fixture(scope="module")
def panoptic12(tmp_path_factory, corpora) -> dict[str, Path]:
    return build_panoptic(corpora, tmp_path_factory.mktemp("pan12") / "coco", RECORDS)


@pytest.fixture(scope="module")
def reference(panoptic12, tmp_path_factory) -> Path:
    """The same conversion, with room to spare and never interrupted."""
    out = tmp_path_factory.mktemp("reference") / "out"
    return convert_local("coco-panoptic", out, panoptic12, ConvertParams(shard_max_samples=SAMPLES_PER_SHARD))


def _convert_args(out: Path, inputs: dict[str, Path]) -> list[str]:
    args = ["data", "convert", "coco-panoptic", "--out", str(out)]
    for name, path in inputs.items():
        args += [f"--{name}", str(path)]
    return [*args, "--shard-max-samples", str(SAMPLES_PER_SHARD)]


class _DiskWithFreeBytes:
    """INJECTED FAULT, test-only: stands in for `open` in `dataprep.shard_writer`. Files it opens are
    real files whose writes succeed until `free` bytes were written in all, then write what still
    fits and fail with ENOSPC, as the kernel does on a full disk."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.failed: list[tuple[Path, int]] = []  # (file, bytes it held) at each ENOSPC

    def open(self, path: Path, mode: str = "r") -> io.BufferedWriter:
        if mode != "wb":
            raise ValueError(f"the shard writer opens shards with 'wb', not {mode!r}")
        return io.BufferedWriter(_FillingFile(self, path))


class _FillingFile(io.FileIO):
    def __init__(self, disk: _DiskWithFreeBytes, path: Path) -> None:
        super().__init__(path, "wb")
        self.disk = disk

    def write(self, data) -> int:  # noqa: ANN001
        fits = min(len(data), self.disk.free)
        if len(data) and not fits:
            self.disk.failed.append((Path(self.name), os.fstat(self.fileno()).st_size))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = super().write(memoryview(data)[:fits])
        self.disk.free -= written
        return written


def _assert_final_shards_complete(out: Path, reference: Path) -> list[str]:
    """Every file under a final shard name is whole: bytes equal to the reference's shard of that name,
    and the sha256 its unit record holds, when there is one. Returns the names."""
    ref = dataset_files(reference)
    records = {
        s["name"]: s["sha256"]
        for p in sorted((out / "_work" / "units").glob("*.json"))
        for s in json.loads(p.read_bytes())["shards"]
    }
    names = sorted(p.name for p in (out / "shards").glob("*.tar")) if (out / "shards").is_dir() else []
    for name in names:
        data = (out / "shards" / name).read_bytes()
        assert data == ref[f"shards/{name}"], f"shards/{name} is partial or wrong: {len(data)} bytes"
        if name in records:
            assert hashlib.sha256(data).hexdigest() == records[name], name
    return names


def _assert_same_as_reference(out: Path, reference: Path) -> None:
    """Byte-identical folder, `_work/` gone, every key and shard exactly once."""
    got, want = dataset_files(out), dataset_files(reference)
    assert sorted(got) == sorted(want), f"extra {set(got) - set(want)}, missing {set(want) - set(got)}"
    assert [name for name in want if got[name] != want[name]] == []
    assert not (out / "_work").exists()
    keys = [row["key"] for row in read_parquet(open_storage(out), INDEX)]
    assert len(keys) == len(set(keys)) == RECORDS
    manifest = read_parquet(open_storage(out), MANIFEST)
    assert sum(r["samples"] for r in manifest) == RECORDS and len({r["name"] for r in manifest}) == len(manifest)


def test_injected_enospc_fails_clearly_keeps_no_partial_shard_and_resumes(
    ray_session, panoptic12, reference, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    shard_bytes = [r["bytes"] for r in read_parquet(open_storage(reference), MANIFEST)]
    disk = _DiskWithFreeBytes(free=shard_bytes[0] + shard_bytes[1] // 2)  # unit 0 fits, unit 1 half
    monkeypatch.setattr(shard_writer, "open", disk.open, raising=False)

    params = ConvertParams(shard_max_samples=SAMPLES_PER_SHARD)
    storage = open_storage(out)
    converter = get_converter("coco-panoptic")(**{k: str(v) for k, v in panoptic12.items()})
    prepared = prepare(converter, storage, params)
    assert len(prepared.units) == 4
    run = [lambda u=u: run_unit(converter, u, storage, params, prepared.digest, prepared.plan.categories)
           for u in prepared.units]
    run[0]()
    with pytest.raises(DiskFullError) as failure:
        run[1]()
    message = str(failure.value)
    for text in ("disk full", f"{out}/shards/shard-000001-00.tar", os.strerror(errno.ENOSPC),
                 f"on the disk holding {out}", "re-run the same command"):
        assert text in message, (text, message)
    # the fault hit mid-shard: a partial file of real bytes was on disk, under a temporary name
    (partial, held), = disk.failed
    assert partial.parent == out / "_work" / "tmp" and partial.name.endswith(".partial")
    assert 0 < held < shard_bytes[1]
    # ... and is gone; nothing partial holds a final name; only unit 0 is recorded as done
    assert not partial.exists()
    assert _assert_final_shards_complete(out, reference) == ["shard-000000-00.tar"]
    leftovers = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
    assert sorted(leftovers) == ["_work/plan.json", "_work/units/000000.json", "shards/shard-000000-00.tar"]
    # still full: the next unit fails the same way, at once
    with pytest.raises(DiskFullError, match="shard-000002-00.tar"):
        run[2]()

    monkeypatch.undo()  # space freed: the same command, through the CLI and Ray, resumes
    done = invoke_cli(*_convert_args(out, panoptic12))
    assert "3 / 1" in done.stdout + done.stderr  # units converted / reused: only unit 0 was kept
    _assert_same_as_reference(out, reference)


def _mount_tmpfs(folder: Path, size: str) -> str | None:
    """Mount a tmpfs of `size` at `folder`; None when done, else why not."""
    if shutil.which("mount") is None:
        return "no `mount` command"
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "none", str(folder)],
                             capture_output=True, text=True)
    return None if mounted.returncode == 0 else (mounted.stderr.strip() or f"mount exited {mounted.returncode}")


@pytest.fixture(scope="session")
def tmpfs_permitted(tmp_path_factory) -> None:
    """Skips where a tmpfs cannot be mounted (a container without the permission), before Ray starts."""
    probe = tmp_path_factory.mktemp("tmpfs-probe")
    why = _mount_tmpfs(probe, "64k")
    if why is not None:
        pytest.skip(f"cannot mount a tmpfs here ({why}); the injected-ENOSPC drill covers the disk-full path")
    subprocess.run(["umount", str(probe)], check=True)


@pytest.fixture()
def small_tmpfs(tmpfs_permitted, tmp_path):
    """A real 1 MiB tmpfs at tmp_path/disk, unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    why = _mount_tmpfs(disk, "1m")
    assert why is None, why
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def test_real_full_tmpfs_fails_clearly_and_resumes_after_space_is_freed(
    tmpfs_permitted, ray_session, panoptic12, reference, small_tmpfs
):
    out = small_tmpfs / "out"
    args = [*_convert_args(out, panoptic12), "--address", ray_session]
    failed = run_cli(*args, check=False)
    flat = " ".join(failed.stderr.split())
    assert failed.returncode == 1, failed.stderr
    for text in ("error: disk full", str(out), os.strerror(errno.ENOSPC), "re-run the same command"):
        assert text in flat, (text, failed.stderr)
    assert "Traceback" not in failed.stderr, failed.stderr
    assert not (out / MANIFEST).exists()
    assert len(_assert_final_shards_complete(out, reference)) < 4  # complete ones only, and not all
    # no temporary file of a failed write is left holding the space the re-run needs
    held = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()
            and (p.name.startswith(".tmp-") or p.name.endswith(".partial"))]
    assert not held, held

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True)  # space freed
    invoke_cli(*args)
    _assert_same_as_reference(out, reference)
