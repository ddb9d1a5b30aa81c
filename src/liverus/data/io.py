"""Reading ultrasound images from files and from untrusted bytes: PNG, JPEG, BMP, TIFF (8/16 bit, float) with
OpenCV, and DICOM with pydicom, through one decoder.

The format is decided from the bytes (DICOM's ``DICM`` marker at offset 128 first, then the image magic numbers),
never from the file name. The dimensions are read from the header before anything is decoded, and images above the
pixel limit (:func:`max_pixels`, ``$LIVERUS_MAX_PIXELS``) are refused, so a small compressed file cannot expand into
gigabytes. Every reader returns a single-channel ``float32`` array scaled to [0, 1], or raises :class:`DataError`
naming the file (never for uploads) and the problem.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
import zlib
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np

from liverus.utils import atomic_write_bytes

# Undecodable files are reported as DataError; OpenCV's own log lines about them would only be noise.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)

__all__ = [
    "DataError",
    "read_image",
    "read_mask",
    "decode_image_bytes",
    "sniff_kind",
    "image_dimensions",
    "max_pixels",
    "IMAGE_SUFFIXES",
    "DICOM_SUFFIXES",
    "KINDS",
    "MIN_SIDE",
    "is_image_file",
    "printable",
    "to_gray_unit",
    "dicom_to_gray",
    "write_png",
]

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
DICOM_SUFFIXES = {".dcm", ".dicom"}
KINDS = ("dicom", "png", "jpeg", "bmp", "tiff")
MIN_SIDE = 16
# 4096 x 4096: ultrasound frames, cine frames included, are at most about 1-2 k pixels a side; the limit leaves room
# for stitched panoramas and refuses decompression bombs before they are decoded.
DEFAULT_MAX_PIXELS = 4096 * 4096
DEFLATED_DICOM = "1.2.840.10008.1.2.1.99"


class DataError(ValueError):
    """A data file or table that cannot be used. The message names the file and the problem."""

    def __init__(self, path: str | os.PathLike | None, problem: str) -> None:
        self.path = printable(path) if path is not None else ""
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


def max_pixels() -> int:
    """The largest image (width x height of one frame) that is decoded: ``$LIVERUS_MAX_PIXELS`` or 4096 x 4096.

    Raises:
        DataError: when the variable is not a positive integer.
    """
    raw = os.environ.get("LIVERUS_MAX_PIXELS", "")
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise DataError(None, f"LIVERUS_MAX_PIXELS must be a positive integer, got {raw!r}")
    return value


def printable(path: str | os.PathLike) -> str:
    """A path as text that any terminal or UTF-8 file can take: bytes that are not UTF-8 (file names from other
    systems) are shown as ``\\xNN`` escapes instead of failing the write."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES | DICOM_SUFFIXES


def sniff_kind(head: bytes) -> str | None:
    """The file type from its first bytes (at least 132), or ``None``.

    DICOM comes first: its 128-byte preamble may legally hold a TIFF header (dual-personality files).
    """
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"BM"):
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return None


def to_gray_unit(arr: np.ndarray, path: str | os.PathLike | None, max_value: float | None = None) -> np.ndarray:
    """Convert a decoded array (H, W) or (H, W, C) to gray float32 in [0, 1].

    Raises:
        DataError: for an unsupported shape or pixel type, or pixel data with NaN or infinite values.
    """
    if arr.ndim == 3:
        if arr.shape[2] == 4:
            arr = arr[:, :, :3]
        elif arr.shape[2] == 2:  # gray + alpha
            arr = arr[:, :, :1]
        if arr.shape[2] == 3:
            # OpenCV decodes to BGR; DICOM RGB arrives as RGB. ITU-R 601 luma weights either way (caller orders).
            arr = cv2.cvtColor(arr, cv2.COLOR_BGR2GRAY) if arr.dtype in (np.uint8, np.uint16) else arr.mean(axis=2)
        elif arr.shape[2] == 1:
            arr = arr[:, :, 0]
        else:
            raise DataError(path, f"unsupported channel count {arr.shape[2]}")
    if arr.ndim != 2:
        raise DataError(path, f"unsupported image shape {arr.shape}")
    if max_value is None:
        if arr.dtype == np.uint8:
            max_value = 255.0
        elif arr.dtype == np.uint16:
            max_value = 65535.0
        elif np.issubdtype(arr.dtype, np.floating):
            if not np.isfinite(arr).all():
                # A blank image with a confident-looking probability is worse than an error.
                raise DataError(path, "pixel data holds NaN or infinite values")
            max_value = 1.0 if arr.max(initial=0) <= 1.0 else float(arr.max())
        else:
            raise DataError(path, f"unsupported pixel type {arr.dtype} (8/16-bit integer or float images only)")
    out = arr.astype(np.float32) / np.float32(max_value)
    return np.clip(out, 0.0, 1.0)


def _dicom_number(ds, keyword: str, default: float, path) -> float:
    """A numeric DICOM attribute that must have one value (several equal values are accepted)."""
    value = getattr(ds, keyword, None)
    if value is None or value == "":
        return default
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        values = {float(v) for v in value}
        if len(values) != 1:
            raise DataError(path, f"DICOM {keyword} has {len(value)} different values {list(value)}; expected one")
        value = values.pop()
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise DataError(path, f"DICOM {keyword} is not a number ({value!r})") from None
    if not np.isfinite(out):
        raise DataError(path, f"DICOM {keyword} is not finite ({value!r})")
    return out or default


def dicom_to_gray(ds, arr: np.ndarray, path) -> np.ndarray:
    """One decoded DICOM frame -> gray float in [0, 1] (colour spaces, rescale, MONOCHROME1)."""
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    samples = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    bits = int(getattr(ds, "BitsStored", 8 * arr.dtype.itemsize) or 8 * arr.dtype.itemsize)
    if samples == 3:  # pydicom 3 hands YBR back as RGB
        rgb = arr.astype(np.float32)
        gray = 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]
        return np.clip(gray / float(2**bits - 1), 0.0, 1.0).astype(np.float32)
    if arr.ndim != 2:
        raise DataError(path, f"unsupported DICOM frame shape {arr.shape}")
    arr = arr.astype(np.float32)
    slope = _dicom_number(ds, "RescaleSlope", 1.0, path)
    intercept = _dicom_number(ds, "RescaleIntercept", 0.0, path)
    arr = arr * slope + intercept
    lo, hi = float(arr.min()), float(arr.max())
    # Scale by the stored bit depth (not per-image min/max) so that brightness stays comparable across images.
    full = float(2**bits - 1) * slope + intercept
    out = (arr - min(intercept, lo)) / max(full - min(intercept, lo), hi - min(intercept, lo), 1e-6)
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _check_size(width: int, height: int, path, limit: int) -> None:
    if width < MIN_SIDE or height < MIN_SIDE:
        raise DataError(path, f"image is too small ({width}x{height} px; at least {MIN_SIDE} px a side)")
    if width * height > limit:
        raise DataError(
            path,
            f"image is {width}x{height} px ({width * height / 1e6:.1f} megapixels), above the limit of "
            f"{limit / 1e6:.1f} megapixels; ultrasound frames are far smaller. Set LIVERUS_MAX_PIXELS (or the "
            "command's --max-pixels) to allow larger images",
        )


def _inflated_size_ok(fp: BinaryIO, start: int, limit_bytes: int) -> bool:
    """Whether a deflated DICOM body inflates to at most ``limit_bytes``, without keeping the output."""
    fp.seek(start)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    while (chunk := fp.read(1 << 16)) and not inflater.eof:
        # Past the end of the stream zlib keeps handing trailing bytes back as unconsumed: stop at eof.
        while chunk and not inflater.eof:
            total += len(inflater.decompress(chunk, 1 << 20))
            if total > limit_bytes:
                return False
            chunk = inflater.unconsumed_tail
    return True


def _decode_dicom(fp: BinaryIO, path, frame: int | None, limit: int) -> np.ndarray:
    import pydicom
    from pydicom.filereader import _read_file_meta_info, read_preamble

    fp.seek(0)
    try:
        # pydicom's own reader of the file meta group, on the open file (its public wrapper takes only paths).
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        body = fp.tell()
        # pydicom inflates a deflated dataset whole before reading a tag: bound that first.
        deflated = str(getattr(meta, "TransferSyntaxUID", "")) == DEFLATED_DICOM
        if deflated and not _inflated_size_ok(fp, body, 4 * limit + (1 << 20)):
            raise DataError(path, "deflated DICOM expands beyond the pixel limit (a decompression bomb?)")
        fp.seek(0)
        header = pydicom.dcmread(fp, stop_before_pixels=True)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(path, f"not a valid DICOM file ({type(exc).__name__}: {exc})") from exc
    rows, cols = int(getattr(header, "Rows", 0) or 0), int(getattr(header, "Columns", 0) or 0)
    if not rows or not cols:
        raise DataError(path, "DICOM has no image (no Rows/Columns; a report or structured document?)")
    _check_size(cols, rows, path, limit)
    n_frames = int(getattr(header, "NumberOfFrames", 1) or 1)
    if n_frames > 1:
        idx = n_frames // 2 if frame is None else frame
        if not 0 <= idx < n_frames:
            raise DataError(path, f"frame {frame} requested but the cine has {n_frames} frames")
    elif frame not in (None, 0):
        raise DataError(path, f"frame {frame} requested but the file has a single frame")
    else:
        idx = None
    fp.seek(0)
    try:
        ds = pydicom.dcmread(fp)
        if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
            raise DataError(path, "DICOM holds no pixel data")
        from pydicom.pixels import pixel_array

        arr = pixel_array(ds, index=idx)  # decodes only the frame that is used
    except DataError:
        raise
    except Exception as exc:  # pydicom raises many types for truncated or unsupported pixel data
        raise DataError(path, f"DICOM pixel data could not be decoded ({type(exc).__name__}: {exc})") from exc
    return dicom_to_gray(ds, arr, path)


def image_dimensions(fp: BinaryIO, kind: str, path=None) -> tuple[int, int]:
    """``(width, height)`` from the header alone (PNG, JPEG, BMP, TIFF via Pillow; DICOM via pydicom).

    Raises:
        DataError: if the header cannot be parsed.
    """
    fp.seek(0)
    if kind == "dicom":
        import pydicom

        try:
            ds = pydicom.dcmread(fp, stop_before_pixels=True)
            return int(ds.Columns), int(ds.Rows)
        except Exception as exc:
            raise DataError(path, f"DICOM header could not be read ({type(exc).__name__}: {exc})") from exc
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp) as im:  # parses the header only
                return im.size
    except Image.DecompressionBombError:
        raise DataError(
            path,
            f"image header declares over {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} megapixels, above the limit of "
            f"{max_pixels() / 1e6:.1f} megapixels (a decompression bomb?)",
        ) from None
    except Exception as exc:
        raise DataError(path, f"{kind.upper()} header could not be read ({type(exc).__name__})") from exc


def _jpeg_complete(data: bytes) -> bool:
    # Entropy-coded data never holds FF D9 (0xFF bytes are stuffed), so an end-of-image marker after the last
    # start-of-scan marks a complete stream; bytes after it (padding, trailers) are tolerated.
    return data.rfind(b"\xff\xd9") > data.rfind(b"\xff\xda") >= 0


def _decode(fp: BinaryIO, path, frame: int | None, limit: int | None) -> np.ndarray:
    limit = limit or max_pixels()
    fp.seek(0)
    head = fp.read(132)
    if not head:
        raise DataError(path, "file is empty (0 bytes)")
    kind = sniff_kind(head)
    if kind is None:
        suffix = Path(str(path)).suffix if path else ""
        named = f"a {suffix!r} file whose " if suffix else ""
        raise DataError(
            path,
            f"could not be decoded: unknown image format ({named}contents are not {', '.join(KINDS)}; the format "
            "is recognised from the contents, not the name)",
        )
    if kind == "dicom":
        img = _decode_dicom(fp, path, frame, limit)
    else:
        if frame not in (None, 0):
            raise DataError(path, f"frame {frame} requested but {kind.upper()} files have a single frame")
        fp.seek(0)
        data = fp.read()
        if kind == "jpeg" and not _jpeg_complete(data):
            # libjpeg pads a truncated stream with grey and only warns; refuse it instead of using it.
            raise DataError(path, "JPEG stream is truncated (no end-of-image marker)")
        _check_size(*image_dimensions(fp, kind, path), path, limit)
        try:
            arr = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
        except cv2.error as exc:
            raise DataError(path, f"{kind.upper()} data could not be decoded ({exc.err})") from exc
        if arr is None:
            raise DataError(path, f"{kind.upper()} data could not be decoded (corrupt or truncated?)")
        img = to_gray_unit(arr, path)
    if img.shape[0] < MIN_SIDE or img.shape[1] < MIN_SIDE:
        raise DataError(path, f"image is too small ({img.shape[1]}x{img.shape[0]} px)")
    return img


def decode_image_bytes(data: bytes, *, frame: int | None = None, limit: int | None = None) -> np.ndarray:
    """Decode an untrusted upload held in memory to gray ``float32`` in [0, 1] (the same checks as files).

    Raises:
        DataError: naming no path, only the problem.
    """
    return _decode(io.BytesIO(data), None, frame, limit)


def read_image(path: str | os.PathLike, *, frame: int | None = None, limit: int | None = None) -> np.ndarray:
    """Read an ultrasound image as gray ``float32`` in [0, 1], shape (H, W).

    Args:
        path: PNG, JPEG, BMP, TIFF (8 or 16 bit, gray or colour, or float) or DICOM (single or multi-frame); the
            format is recognised from the contents, whatever the extension.
        frame: for a DICOM cine, which frame (default: the middle one).
        limit: largest width x height decoded (default: :func:`max_pixels`).

    Returns:
        The image.

    Raises:
        DataError: if the file is missing, not a regular file, empty, truncated, too large, of an unknown format or
            not decodable.
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        problem = "dangling symbolic link" if p.is_symlink() else "file does not exist"
        raise DataError(p, problem) from None
    except OSError as exc:  # ELOOP (symbolic link loop), permissions, names too long
        raise DataError(p, f"cannot be opened ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise DataError(p, "is a folder, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise DataError(p, "is not a regular file (a FIFO, socket or device)")
    if st.st_size == 0:
        raise DataError(p, "file is empty (0 bytes)")
    try:
        with open(p, "rb") as fh:
            return _decode(fh, p, frame, limit)
    except OSError as exc:
        raise DataError(p, f"cannot be read ({exc.strerror or exc})") from None


def read_mask(path: str | os.PathLike, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read a binary mask (any non-zero pixel is foreground) as ``uint8`` {0, 1}.

    Raises:
        DataError: if unreadable or, when ``shape`` is given, of another size than the image.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(p, "mask file does not exist")
    if p.stat().st_size == 0:
        raise DataError(p, "mask file is empty (0 bytes)")
    arr = cv2.imdecode(np.fromfile(p, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
    if arr is None:
        raise DataError(p, "mask could not be decoded")
    if shape is not None and arr.shape != tuple(shape):
        raise DataError(p, f"mask is {arr.shape[1]}x{arr.shape[0]} px but its image is {shape[1]}x{shape[0]} px")
    return (arr > 0).astype(np.uint8)


def write_png(path: str | os.PathLike, image: np.ndarray, *, rgb: bool = False) -> Path:
    """Write a ``uint8`` gray or colour image as PNG atomically (encoded in memory, then renamed into place), so an
    interrupted run leaves no half-written file. ``rgb``: the array is in RGB order (OpenCV writes BGR).

    Raises:
        OSError: when OpenCV cannot encode the array.
    """
    path = Path(path)
    ok, data = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if rgb else image)
    if not ok:
        raise OSError(f"could not encode {path} as PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data.tobytes())
    return path
