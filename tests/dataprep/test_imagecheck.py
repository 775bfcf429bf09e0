"""Tests of dataprep.imagecheck, built from the real COCO samples in the shared corpora.

Each broken input is derived from a real file by one targeted edit (cut, flipped byte, patched
header field), so the test exercises exactly the failure it names.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    CORPORA,  # ../shared/corpora, or the shipped copy in examples/corpora
)
from PIL import Image

from dataprep.imagecheck import (
    DEFAULT_MAX_PIXELS,
    ImageInfo,
    ImageRejected,
    decode_png_array,
    inspect_image,
)
from dataprep.quarantine import RecordRejected

JPEG = CORPORA / "coco_panoptic/val2017/000000439180.jpg"  # 640x360, baseline
PNG = CORPORA / "coco_instances_polygons/val2017/000000039769.png"  # 640x480 RGB
PANOPTIC_PNG = CORPORA / "coco_panoptic/annotations/panoptic_val2017/000000439180.png"
PANOPTIC_JSON = CORPORA / "coco_panoptic/annotations/panoptic_val2017.json"
L_MASK = CORPORA / "interactive/vpmasks/img_vpmask0.png"  # 570x380 mode L



@pytest.fixture(scope="module")
def jpeg() -> bytes:
    return JPEG.read_bytes()


@pytest.fixture(scope="module")
def png() -> bytes:
    return PNG.read_bytes()


def _rejected(data: bytes, reason: str, **kw: object) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        inspect_image(data, **kw)  # type: ignore[arg-type]
    assert info.value.reason == reason, info.value.message
    assert isinstance(info.value, RecordRejected)
    return info.value


def _jpeg_segments(data: bytes) -> dict[int, int]:
    """marker -> offset of its FF, for the header segments up to the first SOS."""
    out: dict[int, int] = {}
    pos = 2
    while True:
        marker = data[pos + 1]
        out.setdefault(marker, pos)
        if marker == 0xDA:
            return out
        pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]


def _png_chunks(data: bytes) -> list[tuple[int, int, bytes]]:
    """(offset, length, type) of every chunk."""
    out, pos = [], 8
    while pos < len(data):
        length, ctype = struct.unpack_from(">I4s", data, pos)
        out.append((pos, length, ctype))
        pos += 12 + length
    return out


def _chunk(ctype: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(
        ">I", zlib.crc32(ctype + payload)
    )


# --- valid inputs -------------------------------------------------------------------------------


def test_real_jpeg_accepted(jpeg: bytes) -> None:
    assert inspect_image(jpeg) == ImageInfo(format="jpeg", ext="jpg", width=640, height=360)
    assert inspect_image(jpeg, verify="full") == inspect_image(jpeg)


def test_real_png_accepted(png: bytes) -> None:
    assert inspect_image(png) == ImageInfo(format="png", ext="png", width=640, height=480)
    assert inspect_image(png, verify="full").width == 640


def test_jpeg_trailing_bytes_after_eoi_allowed(jpeg: bytes) -> None:
    # Cameras append data after EOI; decoders ignore it.
    assert inspect_image(jpeg + b"\x00trailer" * 50).height == 360


def test_progressive_jpeg_accepted(jpeg: bytes) -> None:
    import io

    buf = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(buf, "JPEG", progressive=True, quality=80)
    data = buf.getvalue()
    assert data.count(b"\xff\xda") > 1  # several scans
    assert data[_jpeg_segments(data)[0xC2] + 1] == 0xC2  # progressive SOF
    assert inspect_image(data, verify="full") == ImageInfo("jpeg", "jpg", 640, 360)



# --- JPEG failures ------------------------------------------------------------------------------


def test_truncated_jpeg(jpeg: bytes) -> None:
    err = _rejected(jpeg[: len(jpeg) // 2], "truncated_image")
    assert "without EOI" in err.message and str(len(jpeg) // 2) in err.message


def test_jpeg_cut_inside_header(jpeg: bytes) -> None:
    _rejected(jpeg[:1000], "truncated_image")


def test_jpeg_corrupted_segment_length(jpeg: bytes) -> None:
    dqt = _jpeg_segments(jpeg)[0xDB]
    bad = bytearray(jpeg)
    length = struct.unpack_from(">H", jpeg, dqt + 2)[0]
    struct.pack_into(">H", bad, dqt + 2, length + 7)  # lands inside the next segment
    err = _rejected(bytes(bad), "corrupt_image")
    assert "expected a marker" in err.message

    struct.pack_into(">H", bad, dqt + 2, 1)  # shorter than the length field itself
    _rejected(bytes(bad), "corrupt_image")


def test_jpeg_scan_before_frame_header(jpeg: bytes) -> None:
    sof = _jpeg_segments(jpeg)[0xC0]
    bad = bytearray(jpeg)
    bad[sof + 1] = 0xFE  # SOF -> COM: the scan now has no frame
    err = _rejected(bytes(bad), "corrupt_image")
    assert "before any frame header" in err.message


def test_jpeg_bomb_from_sof(jpeg: bytes) -> None:
    sof = _jpeg_segments(jpeg)[0xC0]
    bad = bytearray(jpeg)
    struct.pack_into(">HH", bad, sof + 5, 65000, 65000)  # height, width
    err = _rejected(bytes(bad), "decompression_bomb")
    assert "65000x65000" in err.message
    # a cap below the real size also trips, from the header
    _rejected(jpeg, "decompression_bomb", max_pixels=640 * 360 - 1)
    assert inspect_image(jpeg, max_pixels=640 * 360).width == 640


def test_full_decode_catches_undecodable_jpeg(jpeg: bytes) -> None:
    # Zeroed entropy data is tolerated by libjpeg (it only warns), so use a real decode failure:
    # the frame's first component points at quantisation table 3, which the file never defines.
    # The structure stays intact, so only the full decode sees it.
    zeroed_at = _jpeg_segments(jpeg)[0xDA] + 14
    zeroed = jpeg[:zeroed_at] + bytes(len(jpeg) - zeroed_at - 2) + b"\xff\xd9"
    inspect_image(zeroed)

    sof = _jpeg_segments(jpeg)[0xC0]
    bad = bytearray(jpeg)
    bad[sof + 2 + 8 + 2] = 3  # component 1: (id, sampling, quant table id)
    assert inspect_image(bytes(bad)) == inspect_image(jpeg)
    err = _rejected(bytes(bad), "corrupt_image", verify="full")
    assert "does not decode" in err.message


def test_full_decode_restores_pillow_guard(jpeg: bytes) -> None:
    before = Image.MAX_IMAGE_PIXELS
    inspect_image(jpeg, verify="full", max_pixels=1_000_000)
    assert Image.MAX_IMAGE_PIXELS == before


def test_random_bytes_unsupported() -> None:
    data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    err = _rejected(data, "unsupported_format")
    assert "neither JPEG" in err.message
    _rejected(b"", "unsupported_format")
    _rejected(b"GIF89a" + data, "unsupported_format")


# --- PNG failures -------------------------------------------------------------------------------


def test_png_flipped_idat_byte_fails_crc(png: bytes) -> None:
    pos, length, ctype = next(c for c in _png_chunks(png) if c[2] == b"IDAT")
    bad = bytearray(png)
    bad[pos + 8 + length // 2] ^= 0x10
    err = _rejected(bytes(bad), "corrupt_image")
    assert "IDAT" in err.message and f"byte {pos}" in err.message and "CRC" in err.message


def test_truncated_png(png: bytes) -> None:
    _rejected(png[: len(png) // 2], "truncated_image")
    err = _rejected(png[:-12], "truncated_image")  # every chunk intact, IEND missing
    assert "IEND" in err.message


def test_png_bomb_refused_from_header(png: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    bomb = png[:8] + _chunk(b"IHDR", ihdr) + png[33:]

    def no_decode(*args: object, **kwargs: object) -> None:
        raise AssertionError("the bomb must be refused before Pillow opens it")

    monkeypatch.setattr(Image, "open", no_decode)
    for verify in ("structural", "full"):
        err = _rejected(bomb, "decompression_bomb", verify=verify)
        assert "100000x100000" in err.message
    with pytest.raises(ImageRejected) as info:
        decode_png_array(bomb)
    assert info.value.reason == "decompression_bomb"
    assert DEFAULT_MAX_PIXELS == 16_384 * 16_384


def test_png_zero_size_rejected(png: bytes) -> None:
    ihdr = struct.pack(">IIBBBBB", 0, 480, 8, 2, 0, 0, 0)
    _rejected(png[:8] + _chunk(b"IHDR", ihdr) + png[33:], "corrupt_image")


def test_png_full_decode_catches_bad_zlib_stream(png: bytes) -> None:
    # IDAT replaced by junk with a valid CRC: structurally fine, undecodable.
    pos, length, _ = next(c for c in _png_chunks(png) if c[2] == b"IDAT")
    junk = bytes((i * 37) & 0xFF for i in range(length))
    bad = png[:pos] + _chunk(b"IDAT", junk) + png[pos + 12 + length :]
    inspect_image(bad)
    _rejected(bad, "corrupt_image", verify="full")


# --- masks --------------------------------------------------------------------------------------


def test_decode_panoptic_png_ids_match_segments_info() -> None:
    arr = decode_png_array(PANOPTIC_PNG.read_bytes())
    assert arr.shape == (360, 640, 3) and arr.dtype == np.uint8
    rgb = arr.astype(np.int64)
    ids = set(np.unique(rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]).tolist())
    ann = json.loads(PANOPTIC_JSON.read_text())["annotations"][0]
    assert ann["file_name"] == PANOPTIC_PNG.name
    listed = {s["id"] for s in ann["segments_info"]}
    assert ids - {0} == listed  # 0 = void


def test_decode_l_and_p_masks_keep_raw_values(tmp_path: Path) -> None:
    if L_MASK.exists():
        arr = decode_png_array(L_MASK.read_bytes())
        assert arr.shape == (380, 570) and arr.dtype == np.uint8

    # A palette PNG whose palette maps index 1 to (200, 10, 10): the raw index must come back.
    labels = (np.arange(64 * 48, dtype=np.uint8) % 5).reshape(48, 64)
    im = Image.new("P", (64, 48))
    im.putpalette([0, 0, 0, 200, 10, 10, 0, 200, 0, 0, 0, 200, 50, 50, 50] + [0] * 749)
    im.putdata(labels.ravel().tolist())
    path = tmp_path / "p.png"
    im.save(path)
    arr = decode_png_array(path.read_bytes())
    assert arr.shape == (48, 64) and np.array_equal(arr, labels)
    assert arr.flags.writeable


def test_decode_png_array_rejects_other_modes_and_jpeg(tmp_path: Path, jpeg: bytes) -> None:
    path = tmp_path / "rgba.png"
    Image.new("RGBA", (8, 8)).save(path)
    with pytest.raises(ImageRejected) as info:
        decode_png_array(path.read_bytes())
    assert info.value.reason == "corrupt_image" and "RGBA" in info.value.message
    with pytest.raises(ImageRejected) as info:
        decode_png_array(jpeg)
    assert info.value.reason == "unsupported_format"
