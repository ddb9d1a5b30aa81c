"""A corpus of hostile and odd input files, generated (never committed as binaries).

``write_corpus(folder)`` writes every kind into ``folder`` and returns :class:`Kind` records: the file (or path) name,
whether liverus must accept it (``good``) and, for bad ones, a fragment the error message must contain. The kinds cover
what a hostile user tried against ``predict``, ``data audit`` and ``serve``: empty, truncated and corrupt files of every
format, decompression bombs (PNG, BMP, TIFF, JPEG headers, deflated DICOM), odd pixel types, NaN/inf, tiny images,
multi-valued DICOM attributes, files named for another format, and paths that are not files at all.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np


@dataclass(frozen=True)
class Kind:
    name: str  # file name inside the corpus folder
    good: bool  # liverus must read it
    problem: str = ""  # a fragment of the message for bad ones (case-insensitive)
    is_path: bool = False  # not a regular file (link, FIFO, folder): no bytes to upload


def _png(arr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", arr)
    assert ok
    return buf.tobytes()


def _pil_png(arr: np.ndarray, mode: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(arr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", arr)
    assert ok
    return buf.tobytes()


def _gray(h: int = 96, w: int = 128, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 40, (h, w), dtype=np.uint8)
    cv2.ellipse(img, (w // 2, h // 2), (w // 4, h // 5), 0, 0, 360, 160, -1)
    return img


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int, height: int, *, real: bool) -> bytes:
    """A gray 8-bit PNG header of ``width x height``; with ``real`` a complete zero image (compresses ~1000:1)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    if real:
        comp = zlib.compressobj(9)
        row = b"\0" * (width + 1)
        idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    else:
        idat = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _bmp_header(width: int, height: int) -> bytes:
    row = (width * 3 + 3) // 4 * 4
    size = 54 + row * height
    return (
        b"BM"
        + struct.pack("<IHHI", size & 0xFFFFFFFF, 0, 0, 54)
        + struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    )


def _tiff_header(width: int, height: int) -> bytes:
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, width * height)]  # fmt: skip
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0\0\0\0"
    return b"II*\x00" + struct.pack("<I", 8 + 0) + ifd


def _jpeg_with_size(width: int, height: int) -> bytes:
    """A real small JPEG whose SOF0 header is rewritten to declare ``width x height``."""
    data = bytearray(_jpeg(_gray()))
    i = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, i + 5, height, width)
    return bytes(data)


def _dicom(
    arr: np.ndarray | None,
    *,
    slope=None,
    preamble: bytes = b"\0" * 128,
    deflate: bool = False,
    truncate: int = 0,
) -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian if deflate else ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=preamble)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    if arr is not None:
        ds.Rows, ds.Columns = arr.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 8 * arr.dtype.itemsize
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 0
        ds.PixelData = arr.tobytes()
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = 0
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    return data[: len(data) - truncate] if truncate else data


def _tiff_float(values: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".tiff", values.astype(np.float32))
    assert ok
    return buf.tobytes()


def write_corpus(folder: str | Path) -> list[Kind]:
    """Write every kind into ``folder`` (created) and return their records."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = _gray()
    jpeg = _jpeg(g)
    png = _png(g)
    kinds: list[tuple[Kind, bytes | None]] = []

    def add(name: str, data: bytes | None, good: bool = False, problem: str = "") -> None:
        kinds.append((Kind(name, good, problem), data))

    # -- files liverus must read (they were refused or garbled before)
    add("good.png", png, True)
    add("good.jpg", jpeg, True)
    add("png_named.jpg", png, True)  # the format comes from the bytes
    add("jpeg_named.png", jpeg, True)
    add("jpeg_trailing_bytes.jpg", jpeg + b"trailer written by a PACS export\0\0", True)
    add("gray_alpha.png", _pil_png(np.dstack([g, np.full_like(g, 255)]), "LA"), True)
    add("rgba.png", _png(np.dstack([g, g, g, np.full_like(g, 255)])), True)
    add("sixteen_bit.png", _png(g.astype(np.uint16) * 257), True)
    add("float_unit.tiff", _tiff_float(g / 255.0), True)
    add("dicom_tiff_preamble.dcm", _dicom(g, preamble=(b"II*\x00" + b"\0" * 124)), True)
    add("dicom_equal_slopes.dcm", _dicom(g, slope=[1.0, 1.0]), True)
    add("dicom_named.png", _dicom(g), True)
    # -- empty, junk and unknown formats
    add("empty.png", b"", problem="empty")
    add("text.png", b"this is not an image at all\n" * 10, problem="unknown image format")
    add("text.dcm", b"not a dicom file\n" * 20, problem="unknown image format")
    add("animation.gif", b"GIF89a" + b"\0" * 200, problem="unknown image format")
    add("webp_named.png", b"RIFF\x10\0\0\0WEBPVP8 " + b"\0" * 200, problem="unknown image format")
    add("zip_named.jpg", b"PK\x03\x04" + b"\0" * 300, problem="unknown image format")
    # -- truncated and corrupt bodies under valid headers
    add("truncated.png", png[: len(png) // 2], problem="could not be decoded")
    add("truncated.jpg", jpeg[: len(jpeg) // 2], problem="truncated")
    add("jpeg_header_only.jpg", jpeg[:20], problem="truncated")
    ok, bmp = cv2.imencode(".bmp", g)
    add("truncated.bmp", bmp.tobytes()[:200], problem="could not be decoded")
    add("bad_idat.png", png[:60] + bytes(len(png) - 60), problem="could not be decoded")
    add("png_zero_width.png", png_bomb(0, 50, real=False), problem="header could not be read")
    # -- too small
    add("tiny.png", _png(g[:8, :8]), problem="too small")
    add("one_pixel.png", _png(g[:1, :1]), problem="too small")
    add("dicom_one_pixel.dcm", _dicom(g[:1, :1]), problem="too small")
    # -- pixel types and values
    ok, tif32 = cv2.imencode(".tiff", g.astype(np.int32) * 1000)
    add("int32.tiff", tif32.tobytes(), problem="unsupported pixel type")
    nan = (g / 255.0).astype(np.float32)
    nan[10:20, 10:20] = np.nan
    add("nan.tiff", _tiff_float(nan), problem="nan or infinite")
    inf = (g / 255.0).astype(np.float32)
    inf[0, 0] = np.inf
    add("inf.tiff", _tiff_float(inf), problem="nan or infinite")
    # -- decompression bombs and huge headers
    add("bomb_40000x30000.png", png_bomb(40000, 30000, real=False), problem="above the limit")
    add("bomb_10000x10000.png", png_bomb(10000, 10000, real=True), problem="above the limit")
    add("bomb.bmp", _bmp_header(30000, 30000) + b"\0" * 1000, problem="above the limit")
    add("bomb.tiff", _tiff_header(30000, 30000) + b"\0" * 1000, problem="above the limit")
    add("bomb_sof.jpg", _jpeg_with_size(60000, 60000), problem="above the limit")
    add("dicom_huge_rows.dcm", _dicom(np.zeros((5000, 5000), np.uint8)), problem="above the limit")
    # 81 MB of zeros deflate to about 80 kB; refused while inflating, before pydicom holds it all.
    add("dicom_deflate_bomb.dcm", _dicom(np.zeros((9000, 9000), np.uint8), deflate=True), problem="deflated")
    # -- DICOM oddities
    add("dicom_multi_slope.dcm", _dicom(g, slope=[1.0, 2.0]), problem="rescaleslope has 2 different values")
    add("dicom_no_pixels.dcm", _dicom(None), problem="no image")
    add("dicom_truncated_pixels.dcm", _dicom(g, truncate=3000), problem="could not be decoded")
    add("dicom_garbage_after_dicm.dcm", b"\0" * 128 + b"DICM" + os.urandom(200), problem="dicom")

    records = []
    for kind, data in kinds:
        (folder / kind.name).write_bytes(data)
        records.append(kind)
    # -- paths that are not (readable) files
    os.symlink(folder / "no_such_target.png", folder / "dangling_link.png")
    records.append(Kind("dangling_link.png", False, "dangling symbolic link", True))
    os.symlink(folder / "loop_b.png", folder / "loop_a.png")
    os.symlink(folder / "loop_a.png", folder / "loop_b.png")
    records.append(Kind("loop_a.png", False, "cannot be opened", True))
    os.mkfifo(folder / "fifo.png")
    records.append(Kind("fifo.png", False, "not a regular file", True))
    (folder / "folder_named.png").mkdir()
    records.append(Kind("folder_named.png", False, "folder", True))
    records.append(Kind("missing.png", False, "does not exist", True))
    return records


def write_non_utf8_image(folder: str | Path) -> bytes:
    """A good PNG whose file name is not valid UTF-8; returns the raw name."""
    name = b"scan_\xff\xfe.png"
    with open(os.path.join(os.fsencode(str(folder)), name), "wb") as fh:
        fh.write(_png(_gray(seed=3)))
    return name
