"""Receive a multipart upload by streaming it to disk, with a size limit.

Starlette's form parser spools every file part to a temporary file of unbounded
size before the route sees it, so a limit could only be checked after the whole
body was on disk. This small reader feeds the request stream to python-multipart's
push parser and writes the file part straight into TUNESMITH_HOME/files/.incoming
while hashing it, stopping at the limit with 413 — memory stays flat whatever the
file's size.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from starlette.requests import Request

from tunesmith.service.errors import APIError

try:  # the package is imported as python_multipart in new releases, multipart in old ones
    from python_multipart.multipart import MultipartParser, parse_options_header
except ImportError:  # pragma: no cover - depends on the installed release
    from multipart.multipart import MultipartParser, parse_options_header

MAX_FIELD_BYTES = 64 * 1024
FORM_OVERHEAD_BYTES = 64 * 1024  # headers and small fields around the file part


@dataclass
class Upload:
    """What a multipart upload carried.

    Attributes:
        path: the file part, on disk (the caller moves or deletes it).
        filename: the client's name for the file (base name only).
        size: bytes in the file part.
        sha256: hex digest of the file part.
        fields: the other (small) form fields.
    """

    path: Path | None = None
    filename: str | None = None
    size: int = 0
    sha256: str = ""
    fields: dict[str, str] = field(default_factory=dict)


class _PartWriter:
    """python-multipart callbacks: headers per part, file data to disk, fields to memory."""

    def __init__(self, incoming: Path, file_field: str, max_bytes: int):
        self.incoming, self.file_field, self.max_bytes = incoming, file_field, max_bytes
        self.upload = Upload()
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._handle = None
        self._digest = None
        self._field_value = bytearray()

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: self._append("_header_field", d[s:e]),
            "on_header_value": lambda d, s, e: self._append("_header_value", d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _append(self, attr: str, data: bytes) -> None:
        setattr(self, attr, getattr(self, attr) + data)

    def _part_begin(self) -> None:
        self._headers, self._name, self._field_value = {}, None, bytearray()

    def _header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        if self._name == self.file_field and b"filename" in options:
            if self._handle is not None:
                raise APIError(400, "Send exactly one file part named 'file'.", param="file")
            filename = options[b"filename"].decode("utf-8", "replace")
            self.upload.filename = os.path.basename(filename.replace("\\", "/")) or "upload"
            fd, tmp = tempfile.mkstemp(prefix="upload-", dir=self.incoming)
            self._handle = os.fdopen(fd, "wb")
            self._digest = hashlib.sha256()
            self.upload.path = Path(tmp)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._handle is not None and self._name == self.file_field and self.upload.path is not None \
                and not self._handle.closed:
            self.upload.size += len(chunk)
            if self.upload.size > self.max_bytes:
                raise APIError(413, f"File is too large: the limit is {self.max_bytes} bytes "
                                    "(TUNESMITH_MAX_UPLOAD_BYTES on the server).", param="file",
                               code="file_too_large")
            self._digest.update(chunk)
            self._handle.write(chunk)
        else:
            self._field_value.extend(chunk)
            if len(self._field_value) > MAX_FIELD_BYTES:
                raise APIError(413, f"Form field {self._name!r} is too large.", param=self._name)

    def _part_end(self) -> None:
        if self._handle is not None and self._name == self.file_field and not self._handle.closed:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self.upload.sha256 = self._digest.hexdigest()
        elif self._name:
            self.upload.fields[self._name] = self._field_value.decode("utf-8", "replace")

    def discard(self) -> None:
        if self._handle is not None and not self._handle.closed:
            self._handle.close()
        if self.upload.path is not None:
            self.upload.path.unlink(missing_ok=True)


async def receive_upload(request: Request, incoming: Path, max_bytes: int, file_field: str = "file") -> Upload:
    """Stream a multipart/form-data body to disk.

    Args:
        request: the incoming request.
        incoming: folder for the partial file (same file system as its final place).
        max_bytes: the largest file accepted.
        file_field: the form field that carries the file.

    Returns:
        the upload, with the file on disk at ``upload.path``.

    Raises:
        APIError: 400 for a body that is not multipart or has no file, 413 when the file is too large.
    """
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in options:
        raise APIError(400, "Send the file as multipart/form-data with fields 'file' and 'purpose'.",
                       param="file")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes + FORM_OVERHEAD_BYTES:
        raise APIError(413, f"File is too large: the request has {declared} bytes and the limit is "
                            f"{max_bytes} bytes (TUNESMITH_MAX_UPLOAD_BYTES on the server).",
                       param="file", code="file_too_large")
    incoming.mkdir(parents=True, exist_ok=True)
    writer = _PartWriter(incoming, file_field, max_bytes)
    parser = MultipartParser(options[b"boundary"], writer.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except APIError:
        writer.discard()
        raise
    except Exception as exc:  # a malformed body: say so instead of a 500
        writer.discard()
        raise APIError(400, f"Could not read the multipart body: {exc}", param="file") from exc
    if writer.upload.path is None or not writer.upload.sha256:
        writer.discard()
        raise APIError(400, "The request has no file: send it in the multipart field 'file'.", param="file")
    return writer.upload
