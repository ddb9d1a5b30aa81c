"""Multipart form uploads read into memory, with the size limit enforced as the bytes arrive.

Starlette's ``UploadFile`` spools anything above 1 MB to a temporary file before a handler can refuse it, so patient
images would touch the disk; here the body never leaves memory and is cut off at the limit. The multipart syntax is
parsed by python-multipart (the parser Starlette itself uses), fed from memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

__all__ = ["FormError", "Form", "read_form"]

# Multipart framing (boundaries, part headers, a few small fields) on top of the file itself.
FRAMING_ALLOWANCE = 64 * 1024


class FormError(Exception):
    """A request whose body cannot be used; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


@dataclass
class Form:
    """A parsed form: one value per field, and for the fields a request may repeat, every value in order."""

    fields: dict[str, bytes] = field(default_factory=dict)
    filenames: dict[str, str] = field(default_factory=dict)
    lists: dict[str, list[bytes]] = field(default_factory=dict)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, read chunk by chunk into memory; 413 as soon as it passes ``limit``."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise FormError(413, f"upload too large (limit {limit // 2**20} MB)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise FormError(413, f"upload too large (limit {limit // 2**20} MB)")
    return bytes(body)


def parse_form(body: bytes, content_type: str, max_fields: int = 8, repeated: tuple[str, ...] = ()) -> Form:
    """Parse a ``multipart/form-data`` body held in memory. Fields named in ``repeated`` may come several times
    (``Form.lists``, in order); any other field only once.

    Raises:
        FormError: 400 for anything that is not a well-formed multipart form.
    """
    ctype, params = parse_options_header(content_type or "")
    if ctype != b"multipart/form-data" or b"boundary" not in params:
        raise FormError(400, "send the image as multipart/form-data (field 'file')")
    form, parts, current = Form(), [], {}

    def on_part_begin() -> None:
        current.clear()
        current.update(name=None, filename=None, data=bytearray(), header_field=b"", headers={})

    def on_header_field(data: bytes, start: int, end: int) -> None:
        current["header_field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        key = current["header_field"].lower()
        current["headers"][key] = current["headers"].get(key, b"") + data[start:end]

    def on_header_end() -> None:
        current["header_field"] = b""

    def on_headers_finished() -> None:
        _, disp = parse_options_header(current["headers"].get(b"content-disposition", b""))
        current["name"] = disp.get(b"name", b"").decode("utf-8", "replace")
        fn = disp.get(b"filename")
        current["filename"] = fn.decode("utf-8", "replace") if fn is not None else None

    def on_part_data(data: bytes, start: int, end: int) -> None:
        current["data"] += data[start:end]

    def on_part_end() -> None:
        parts.append((current["name"], current["filename"], bytes(current["data"])))

    callbacks = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    }
    try:
        parser = MultipartParser(params[b"boundary"], callbacks)
        parser.write(body)
        parser.finalize()
    except Exception as exc:  # python-multipart raises its own errors for malformed framing
        raise FormError(400, f"malformed multipart form ({type(exc).__name__})") from None
    if len(parts) > max_fields:
        raise FormError(400, f"too many form fields ({len(parts)})")
    for name, filename, data in parts:
        if not name:
            continue
        if name in repeated:
            form.lists.setdefault(name, []).append(data)
            continue
        if name in form.fields:
            raise FormError(400, f"form field {name!r} is given twice")
        form.fields[name] = data
        if filename is not None:
            form.filenames[name] = filename
    return form


async def read_form(
    request: Request, max_upload_bytes: int, *, max_fields: int = 8, repeated: tuple[str, ...] = ()
) -> Form:
    """Read and parse the request's form; FormError (413, 400) for bodies that are too large or malformed."""
    body = await read_body(request, max_upload_bytes + FRAMING_ALLOWANCE)
    return parse_form(body, request.headers.get("content-type", ""), max_fields, repeated)
