"""Cheap structural validation of image bytes before any decode, plus an optional full decode.

Every image and mask read from an upstream corpus goes through `inspect_image` (or
`decode_png_array` for masks) before anything else touches it, so that a broken file becomes a
quarantine row with a precise reason instead of a crash, a hang or an out-of-memory kill in a
worker:

- `unsupported_format`: the magic bytes are neither JPEG (FF D8 FF) nor PNG;
- `truncated_image`: the bytes end before the end marker (JPEG EOI, PNG IEND);
- `corrupt_image`: a malformed marker segment, a PNG chunk failing its CRC, or (with
  `verify="full"`) a decode failure;
- `decompression_bomb`: the header declares more pixels than `max_pixels`; this is decided from the
  header alone, before a single pixel is decoded.

The structural check never decodes pixels. For JPEG it walks the marker segments and skips each
scan's entropy-coded data with one compiled-regex search (C speed, no per-byte Python loop); for PNG
it walks the chunks and checks each chunk's CRC with `zlib.crc32` (also C speed). On the 198 KB
COCO JPEG 000000439180.jpg this costs about 0.1 ms, against about 3 ms for a full decode, so it can
run on every record while the full decode stays an option.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from dataprep.quarantine import RecordRejected

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageInfo",
    "ImageRejected",
    "decode_png_array",
    "inspect_image",
]

# 16384 x 16384 = 268M pixels (~805 MB as RGB uint8). Every image of the corpora we convert is far
# below it (COCO images are at most 640 px on a side, ADE20K at most a few thousand), so a real image
# never trips it; a decompression bomb (a few KB of PNG/JPEG declaring e.g. 100000 x 100000 pixels =
# 30 GB decoded) is far above it and is refused from its header before it can exhaust a worker's
# memory. It is also above Pillow's own default warning level (~89M pixels), which is why the full
# decode sets Pillow's guard from this value instead of relying on Pillow's default.
DEFAULT_MAX_PIXELS = 16_384 * 16_384

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# Start-of-frame markers carrying the image size: baseline, extended, progressive, lossless and
# their differential / arithmetic-coded variants. C4 (DHT), C8 (JPG, reserved) and CC (DAC) are not
# frames.
_SOF_MARKERS = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)
_SOS = 0xDA
_EOI = 0xD9
_DRI = 0xDD

# End of a scan's entropy-coded data: the first 0xFF that is neither a stuffed byte (FF 00) nor a
# restart marker (FF D0..D7). One regex search runs in C over the ~200 KB of a typical scan.
_ENTROPY_END = re.compile(rb"\xff[^\x00\xd0-\xd7]")
# A marker: one or more 0xFF (the standard allows fill bytes before a marker) then the marker code.
# A regex so that a file stuffed with megabytes of 0xFF is skipped in C, not byte by byte.
_MARKER = re.compile(rb"\xff+([^\xff])")

# PNG: valid bit depths per colour type (PNG spec, table 11.1).
_PNG_DEPTHS: dict[int, frozenset[int]] = {
    0: frozenset({1, 2, 4, 8, 16}),  # greyscale
    2: frozenset({8, 16}),  # truecolour
    3: frozenset({1, 2, 4, 8}),  # indexed
    4: frozenset({8, 16}),  # greyscale + alpha
    6: frozenset({8, 16}),  # truecolour + alpha
}
_PNG_MAX_DIM = 2**31 - 1  # the PNG spec limit for width, height and chunk length

_FIX_REDOWNLOAD = "re-download or re-extract the file"


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What the structural check learned from an image's header."""

    format: Literal["jpeg", "png"]
    ext: Literal["jpg", "png"]  # the file extension to store the bytes under
    width: int
    height: int


class ImageRejected(RecordRejected):
    """The image bytes are unusable; `reason` is one of the image reason codes of `REASONS`."""


def _truncated(message: str) -> ImageRejected:
    return ImageRejected("truncated_image", message)


def _corrupt(message: str) -> ImageRejected:
    return ImageRejected("corrupt_image", message)


def _check_pixels(kind: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageRejected(
            "decompression_bomb",
            f"{kind} header declares {width}x{height} = {width * height:,} pixels, above the cap of "
            f"{max_pixels:,} pixels; refused before decoding (raise --max-pixels only if the image "
            "is genuinely that large)",
        )


def _inspect_jpeg(data: bytes, max_pixels: int) -> tuple[int, int]:
    """Walk the JPEG marker segments; return (width, height) from the frame header (SOF)."""
    n = len(data)
    pos = 2  # just after SOI (FF D8); the magic check guaranteed data[2] == 0xFF
    size: tuple[int, int] | None = None
    sof_at = -1
    scans = 0
    while True:
        m = _MARKER.match(data, pos)
        if m is None:
            if pos >= n or data[pos] == 0xFF:  # only fill bytes left: cut before a marker
                raise _truncated(
                    f"JPEG ends at byte {n} without EOI marker (FF D9): the file is truncated; "
                    f"{_FIX_REDOWNLOAD}"
                )
            raise _corrupt(
                f"JPEG: expected a marker (FF xx) at byte {pos}, found byte 0x{data[pos]:02X}: a "
                "segment length is wrong or the data between segments is damaged"
            )
        marker_at = m.start(1) - 1  # offset of the FF right before the marker code
        marker = m.group(1)[0]
        pos = m.end()
        if marker == _EOI:
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            continue  # RSTn / TEM: standalone markers without a length; harmless here
        if marker == 0x00 or marker == 0xD8 or 0x02 <= marker <= 0xBF:
            raise _corrupt(
                f"JPEG: unexpected marker FF {marker:02X} at byte {marker_at} between segments "
                "(a second SOI, a stuffed byte or a reserved code): the structure is damaged"
            )
        # Every other marker (APPn, COM, DQT, DHT, DAC, DRI, DNL, DHP, EXP, SOFn, SOS, JPGn) is
        # followed by a 2-byte big-endian length that counts itself but not the marker.
        if pos + 2 > n:
            raise _truncated(
                f"JPEG ends at byte {n} inside the header of segment FF {marker:02X} at byte "
                f"{marker_at}, without EOI marker (FF D9): the file is truncated; {_FIX_REDOWNLOAD}"
            )
        (seglen,) = struct.unpack_from(">H", data, pos)
        if seglen < 2:
            raise _corrupt(
                f"JPEG segment FF {marker:02X} at byte {marker_at} has length {seglen} (< 2, the "
                "length field itself): the segment header is damaged"
            )
        end = pos + seglen
        if end > n:
            raise _truncated(
                f"JPEG segment FF {marker:02X} at byte {marker_at} declares {seglen} bytes but the "
                f"file ends at byte {n}, without EOI marker (FF D9): the file is truncated; "
                f"{_FIX_REDOWNLOAD}"
            )
        if marker in _SOF_MARKERS:
            if size is not None:
                raise _corrupt(
                    f"JPEG has a second frame header (SOF FF {marker:02X}) at byte {marker_at}, "
                    f"after the one at byte {sof_at}: the structure is damaged"
                )
            if seglen < 8:
                raise _corrupt(
                    f"JPEG frame header (SOF FF {marker:02X}) at byte {marker_at} is {seglen} bytes "
                    "long, shorter than the 8 bytes that hold the image size"
                )
            height, width, ncomp = struct.unpack_from(">HHB", data, pos + 3)
            if ncomp == 0 or seglen != 8 + 3 * ncomp:
                raise _corrupt(
                    f"JPEG frame header (SOF FF {marker:02X}) at byte {marker_at} declares "
                    f"{ncomp} components but is {seglen} bytes long (expected {8 + 3 * ncomp})"
                )
            if width == 0 or height == 0:
                # Height 0 is legal only with a later DNL marker, which Pillow does not support.
                raise _corrupt(
                    f"JPEG frame header at byte {marker_at} declares a {width}x{height} image "
                    "(zero width or height)"
                )
            _check_pixels("JPEG", width, height, max_pixels)
            size = (width, height)
            sof_at = marker_at
        elif marker == _SOS:
            if size is None:
                raise _corrupt(
                    f"JPEG scan (SOS) at byte {marker_at} comes before any frame header (SOF): "
                    "the image size is unknown and the data cannot be decoded"
                )
            ns = data[pos + 2] if seglen > 2 else 0
            if not 1 <= ns <= 4 or seglen != 6 + 2 * ns:
                raise _corrupt(
                    f"JPEG scan header (SOS) at byte {marker_at} declares {ns} components but is "
                    f"{seglen} bytes long (expected 1..4 components and {6 + 2 * ns} bytes)"
                )
            scans += 1
            # Skip the entropy-coded data in C; a progressive JPEG simply has several SOS.
            e = _ENTROPY_END.search(data, end)
            if e is None:
                raise _truncated(
                    f"JPEG ends at byte {n} inside the entropy-coded data of the scan at byte "
                    f"{marker_at}, without EOI marker (FF D9): the file is truncated; "
                    f"{_FIX_REDOWNLOAD}"
                )
            pos = e.start()
            continue
        elif marker == _DRI and seglen != 4:
            raise _corrupt(
                f"JPEG restart-interval segment (DRI) at byte {marker_at} is {seglen} bytes long "
                "(expected 4)"
            )
        pos = end
    if size is None or scans == 0:
        raise _corrupt(
            f"JPEG reaches its EOI marker at byte {marker_at} without "
            f"{'a frame header (SOF)' if size is None else 'any scan (SOS)'}: it holds no image data"
        )
    return size


def _inspect_png(data: bytes, max_pixels: int) -> tuple[int, int]:
    """Walk the PNG chunks checking each CRC; return (width, height) from IHDR."""
    n = len(data)
    pos = 8  # after the signature
    size: tuple[int, int] | None = None
    idat = False
    # memoryview slices do not copy: the CRC of a 700 KB IDAT is computed in place.
    with memoryview(data) as view:
        while True:
            if pos + 12 > n:
                raise _truncated(
                    f"PNG ends at byte {n} without IEND chunk: the file is truncated; "
                    f"{_FIX_REDOWNLOAD}"
                )
            length, ctype = struct.unpack_from(">I4s", data, pos)
            name = ctype.decode("latin-1")
            if not ctype.isalpha():
                raise _corrupt(
                    f"PNG chunk at byte {pos} has an invalid type {ctype!r} (not 4 ASCII letters): "
                    "a chunk length is wrong or the data is damaged"
                )
            if length > _PNG_MAX_DIM:
                raise _corrupt(
                    f"PNG chunk {name} at byte {pos} declares length {length}, above the PNG "
                    f"limit of {_PNG_MAX_DIM}"
                )
            end = pos + 12 + length
            if end > n:
                raise _truncated(
                    f"PNG chunk {name} at byte {pos} declares {length} data bytes but the file "
                    f"ends at byte {n}, without IEND chunk: the file is truncated; {_FIX_REDOWNLOAD}"
                )
            (stored,) = struct.unpack_from(">I", data, pos + 8 + length)
            computed = zlib.crc32(view[pos + 4 : pos + 8 + length])
            if computed != stored:
                raise _corrupt(
                    f"PNG chunk {name} at byte {pos} fails its CRC check (stored 0x{stored:08X}, "
                    f"computed 0x{computed:08X}): the chunk data is corrupt; {_FIX_REDOWNLOAD}"
                )
            if size is None:
                if ctype != b"IHDR" or length != 13:
                    raise _corrupt(
                        f"PNG first chunk is {name} ({length} bytes) at byte {pos}; expected IHDR "
                        "(13 bytes) holding the image size"
                    )
                width, height, depth, color, comp, filt, interlace = struct.unpack_from(
                    ">IIBBBBB", data, pos + 8
                )
                if not (0 < width <= _PNG_MAX_DIM and 0 < height <= _PNG_MAX_DIM):
                    raise _corrupt(
                        f"PNG IHDR declares a {width}x{height} image (each side must be "
                        f"1..{_PNG_MAX_DIM})"
                    )
                if depth not in _PNG_DEPTHS.get(color, ()) or comp or filt or interlace > 1:
                    raise _corrupt(
                        f"PNG IHDR declares an invalid combination: bit depth {depth}, colour type "
                        f"{color}, compression {comp}, filter {filt}, interlace {interlace}"
                    )
                # Decided here, from the header, before the rest of the file is even read.
                _check_pixels("PNG", width, height, max_pixels)
                size = (width, height)
            elif ctype == b"IHDR":
                raise _corrupt(f"PNG has a second IHDR chunk at byte {pos}")
            elif ctype == b"IDAT":
                idat = True
            elif ctype == b"IEND":
                break
            pos = end
    if not idat:
        raise _corrupt(f"PNG reaches IEND at byte {pos} without any IDAT chunk: it holds no pixels")
    return size


def _structural(data: bytes, max_pixels: int) -> ImageInfo:
    if data[:3] == _JPEG_MAGIC:
        width, height = _inspect_jpeg(data, max_pixels)
        return ImageInfo(format="jpeg", ext="jpg", width=width, height=height)
    if data[:8] == _PNG_MAGIC:
        width, height = _inspect_png(data, max_pixels)
        return ImageInfo(format="png", ext="png", width=width, height=height)
    head = bytes(data[:8]).hex(" ").upper()
    raise ImageRejected(
        "unsupported_format",
        f"{len(data)} bytes starting with [{head}] are neither JPEG (FF D8 FF) nor PNG "
        "(89 50 4E 47 0D 0A 1A 0A); only JPEG and PNG images are supported",
    )


def _decode(data: bytes, info: ImageInfo, max_pixels: int) -> Image.Image:
    """Decode fully with Pillow; any failure becomes `corrupt_image`.

    Pillow's own bomb guard (`Image.MAX_IMAGE_PIXELS`, a module global) is set to `max_pixels` for
    the duration of the decode and restored afterwards, so a caller's setting is not clobbered. This
    is not thread-safe; conversion workers are processes, one decode at a time.
    """
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        # `formats=` keeps Pillow from trying every other plugin on bytes we already identified.
        im = Image.open(io.BytesIO(data), formats=["JPEG" if info.format == "jpeg" else "PNG"])
        im.load()
    except Image.DecompressionBombError as exc:
        raise ImageRejected("decompression_bomb", f"Pillow refused to decode: {exc}") from exc
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, zlib.error, ...
        raise _corrupt(
            f"{info.format.upper()} ({info.width}x{info.height}) passes the structural check but "
            f"does not decode: {type(exc).__name__}: {exc}; {_FIX_REDOWNLOAD}"
        ) from exc
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    if im.size != (info.width, info.height):
        raise _corrupt(
            f"{info.format.upper()} decodes to {im.size[0]}x{im.size[1]} but its header declares "
            f"{info.width}x{info.height}"
        )
    return im


def inspect_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    verify: Literal["structural", "full"] = "structural",
) -> ImageInfo:
    """Identify and validate image bytes; raise `ImageRejected` with a reason code if unusable.

    `verify="structural"` checks the container only (markers / chunks / CRCs / end marker / header
    size against `max_pixels`) without decoding; `verify="full"` then also decodes with Pillow and
    checks the decoded size against the header.
    """
    if verify not in ("structural", "full"):
        raise ValueError(f"verify must be 'structural' or 'full', got {verify!r}")
    info = _structural(data, max_pixels)
    if verify == "full":
        _decode(data, info, max_pixels).close()
    return info


def decode_png_array(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a mask PNG to its raw array: (H, W) uint8 for modes 'L' and 'P', (H, W, 3) for RGB.

    Mode 'P' is NOT converted through its palette: ADE20K-style masks store class indices as
    palette indices, and the palette only colours them for viewing. COCO panoptic masks are RGB
    (segment id = R + 256 G + 256^2 B). The structural check (CRCs, IEND, pixel cap) runs first, so
    a bomb is refused before decoding. Other modes (16-bit, alpha, 1-bit) -> `corrupt_image`.
    """
    info = _structural(data, max_pixels)
    if info.format != "png":
        raise ImageRejected(
            "unsupported_format",
            f"mask is a {info.format.upper()} ({info.width}x{info.height}); masks must be PNG "
            "(a lossy JPEG would alter the ids)",
        )
    im = _decode(data, info, max_pixels)
    try:
        if im.mode not in ("L", "P", "RGB"):
            raise _corrupt(
                f"mask PNG ({info.width}x{info.height}) has mode {im.mode!r}; expected 'L' or 'P' "
                "(8-bit class/instance indices) or 'RGB' (panoptic ids); re-export the mask as "
                "8-bit grey, palette or RGB"
            )
        # np.array (not asarray) so the caller gets a writable array it owns.
        arr = np.array(im, dtype=np.uint8)
    finally:
        im.close()
    return arr
