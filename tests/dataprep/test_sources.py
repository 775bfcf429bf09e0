"""Tests of dataprep.sources: folder / zip / tar / tar.gz trees built from the real COCO samples."""

from __future__ import annotations

import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import pytest
from builders import tar_add, tar_link
from conftest import (
    CORPORA,  # ../shared/corpora, or the shipped copy in examples/corpora
)

from dataprep.quarantine import InputError, RecordRejected
from dataprep.sources import (
    FileTree,
    FolderTree,
    MissingFile,
    TarTree,
    UnsafeName,
    ZipTree,
    open_tree,
)

JPEG = CORPORA / "coco_panoptic/val2017/000000439180.jpg"
PNG = CORPORA / "coco_instances_polygons/val2017/000000039769.png"
MASK = CORPORA / "coco_panoptic/annotations/panoptic_val2017/000000439180.png"


NAMES = ["000000039769.png", "000000439180.jpg", "sub/000000439180.png"]


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    return {NAMES[0]: PNG.read_bytes(), NAMES[1]: JPEG.read_bytes(), NAMES[2]: MASK.read_bytes()}


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory, files: dict[str, bytes]) -> dict[str, Path]:
    """The same three files as a folder, a zip with a top-level folder, a tar and a tar.gz."""
    base = tmp_path_factory.mktemp("trees")
    folder = base / "val2017"
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)

    zpath = base / "val2017.zip"  # like COCO: every member under val2017/
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("val2017/", b"")
        for name, data in files.items():
            zf.writestr(f"val2017/{name}", data)

    paths = {"folder": folder, "zip": zpath}
    for key, mode, suffix in (("tar", "w", ".tar"), ("tgz", "w:gz", ".tar.gz")):
        path = base / f"val2017{suffix}"
        with tarfile.open(path, mode) as tf:
            for name, data in files.items():
                tar_add(tf, name, data)  # no top-level folder
        paths[key] = path
    return paths


@pytest.mark.parametrize("kind", ["folder", "zip", "tar", "tgz"])
def test_reads_byte_equal(trees: dict[str, Path], files: dict[str, bytes], kind: str) -> None:
    tree = open_tree(trees[kind])
    assert isinstance(tree, {"folder": FolderTree, "zip": ZipTree}.get(kind, TarTree))
    assert tree.names() == NAMES
    # reverse order too: exercises backward seeks on the gz stream
    for name in [*NAMES, *reversed(NAMES)]:
        assert tree.read(name) == files[name]
        assert tree.size(name) == len(files[name])
    assert tree.size("nope.jpg") is None
    tree.close()


def test_zip_matches_exact_member_name_too(trees: dict[str, Path], files: dict[str, bytes]) -> None:
    tree = open_tree(trees["zip"])
    # annotations may carry the folder in the name ("val2017/x.jpg")
    assert tree.read("val2017/000000439180.jpg") == files["000000439180.jpg"]
    assert tree.read("./sub/000000439180.png") == files["sub/000000439180.png"]


@pytest.mark.parametrize("kind", ["folder", "zip", "tar", "tgz"])
@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "sub/../../x.jpg", "..\\x.jpg", "C:/x"])
def test_unsafe_names_refused(trees: dict[str, Path], kind: str, name: str) -> None:
    tree = open_tree(trees[kind])
    with pytest.raises(UnsafeName) as info:
        tree.read(name)
    assert info.value.reason == "unsafe_path"
    assert isinstance(info.value, RecordRejected)
    with pytest.raises(UnsafeName):
        tree.size(name)


@pytest.mark.parametrize("kind", ["folder", "zip", "tar", "tgz"])
def test_missing_file(trees: dict[str, Path], kind: str) -> None:
    tree = open_tree(trees[kind])
    with pytest.raises(MissingFile) as info:
        tree.read("000000000001.jpg")
    assert info.value.reason == "missing_file"
    assert "000000000001.jpg" in info.value.message and str(trees[kind]) in info.value.message


def test_tar_links_and_escaping_members_refused(tmp_path: Path, files: dict[str, bytes]) -> None:
    path = tmp_path / "evil.tar"
    jpg = files["000000439180.jpg"]
    with tarfile.open(path, "w") as tf:
        tar_add(tf, "imgs/000000439180.jpg", jpg)
        tar_link(tf, "imgs/link.jpg", "/etc/passwd", tarfile.SYMTYPE)
        tar_link(tf, "imgs/hard.jpg", "/etc/passwd", tarfile.LNKTYPE)
        tar_add(tf, "../evil.jpg", b"escaped")
        tar_add(tf, "/abs.jpg", b"absolute")
    tree = open_tree(path)
    # the unsafe members must not hide the single top-level folder of the rest
    assert tree.names() == ["000000439180.jpg"]
    assert tree.read("000000439180.jpg") == jpg
    for name in ("link.jpg", "imgs/link.jpg", "hard.jpg"):
        with pytest.raises(UnsafeName) as info:
            tree.read(name)
        assert "link" in info.value.message
    for name in ("../evil.jpg", "/abs.jpg"):
        with pytest.raises(UnsafeName):
            tree.read(name)
    # a plain name never resolves to the escaping member
    with pytest.raises(MissingFile):
        tree.read("evil.jpg")
    kinds = {e.name: e.kind for e in tree.index_entries()}
    assert kinds["imgs/link.jpg"] == "symlink" and kinds["../evil.jpg"] == "unsafe_name"


def test_zip_symlink_and_escaping_members_refused(tmp_path: Path, files: dict[str, bytes]) -> None:
    path = tmp_path / "evil.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("a.jpg", files["000000439180.jpg"])
        link = zipfile.ZipInfo("link.jpg")
        link.external_attr = (0o120777 << 16)  # unix symlink: the data is the target path
        zf.writestr(link, "/etc/passwd")
        zf.writestr("../evil.jpg", b"escaped")
    tree = open_tree(path)
    assert tree.names() == ["a.jpg"]
    with pytest.raises(UnsafeName):
        tree.read("link.jpg")
    with pytest.raises(UnsafeName):
        tree.read("../evil.jpg")


def test_folder_symlink_outside_refused(tmp_path: Path, files: dict[str, bytes]) -> None:
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(b"secret")
    root = tmp_path / "images"
    root.mkdir()
    (root / "a.jpg").write_bytes(files["000000439180.jpg"])
    (root / "escape.jpg").symlink_to(outside)
    (root / "inside.jpg").symlink_to(root / "a.jpg")  # stays inside: fine
    (root / "dir").symlink_to(tmp_path, target_is_directory=True)
    tree = open_tree(root)
    assert tree.names() == ["a.jpg", "inside.jpg"]
    assert tree.read("inside.jpg") == files["000000439180.jpg"]
    for name in ("escape.jpg", "dir/secret.jpg"):
        with pytest.raises(UnsafeName) as info:
            tree.read(name)
        assert "outside the folder" in info.value.message


def test_open_tree_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError) as info:
        open_tree(tmp_path / "val2017.zip", option="--images", hint="pass the COCO val2017 folder")
    msg = str(info.value)
    assert "--images" in msg and "not found" in msg and "val2017.zip" in msg
    other = tmp_path / "x.rar"
    other.write_bytes(b"Rar!")
    with pytest.raises(InputError):
        open_tree(other)
    fake = tmp_path / "fake.zip"
    fake.write_bytes(b"not a zip at all")
    with pytest.raises(InputError):
        open_tree(fake)
    fake_tar = tmp_path / "fake.tar"
    fake_tar.write_bytes(b"x" * 1024)
    with pytest.raises(InputError):
        open_tree(fake_tar)


@pytest.mark.parametrize("kind", ["folder", "zip", "tar", "tgz"])
def test_pickle_after_use(trees: dict[str, Path], files: dict[str, bytes], kind: str) -> None:
    tree: FileTree = open_tree(trees[kind])
    assert tree.read(NAMES[1]) == files[NAMES[1]]  # opens and caches handles
    blob = pickle.dumps(tree)
    assert len(blob) < 4096  # no file contents or handles travel
    clone = pickle.loads(blob)
    assert clone.read(NAMES[2]) == files[NAMES[2]]
    assert clone.names() == NAMES
    assert tree.read(NAMES[0]) == files[NAMES[0]]  # the original still works


def test_tar_index_travels_and_detects_change(tmp_path: Path, files: dict[str, bytes]) -> None:
    path = tmp_path / "a.tar"
    with tarfile.open(path, "w") as tf:
        tar_add(tf, "a.jpg", files["000000439180.jpg"])
    tree = open_tree(path)
    assert [e.name for e in tree.index_entries()] == ["a.jpg"]  # type: ignore[attr-defined]
    clone = pickle.loads(pickle.dumps(tree))
    assert clone._index is not None  # no re-scan in the worker
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(InputError, match="changed since"):
        clone.read("a.jpg")


def test_truncated_tar_stops_the_run(tmp_path: Path, files: dict[str, bytes]) -> None:
    # A cut archive is a failed download, not one bad record: InputError, naming the fix.
    path = tmp_path / "cut.tar"
    with tarfile.open(path, "w") as tf:
        tar_add(tf, "a.jpg", files["000000439180.jpg"])
    data = path.read_bytes()
    path.write_bytes(data[: 512 + 1000])  # header + the first 1000 bytes of the member
    tree = open_tree(path)
    with pytest.raises(InputError, match="re-download") as info:
        tree.read("a.jpg")
    assert str(path) in str(info.value)
