"""Read a data file into JSON records, one at a time, each with its line number.

The first transform of the data chain. Three containers are understood:

* JSONL (the default): one JSON object per line; blank lines are skipped.
* a JSON array of objects, when the file's first character is ``[``;
* CSV with a header row, when the file name ends in ``.csv``.

UTF-8 with or without a byte-order mark, CRLF or LF line ends. Invalid UTF-8, a
binary file, an empty file and a line that is not a JSON object are reported at
their line into a :class:`~tunesmith.data.problems.Problems` list; reading goes
on so that every problem in the file is reported at once.
"""

from __future__ import annotations

import codecs
import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from tunesmith.data.problems import LineProblems, Problems, describe_type
from tunesmith.errors import NotFoundError

SNIFF_BYTES = 64 * 1024
JSONL_FIX = 'put one JSON object per line, e.g. {"messages": [{"role": "user", "content": "…"}, …]}'
UTF8_FIX = "save the file as UTF-8"


@dataclass
class Record:
    """One JSON object from the file.

    Attributes:
        line: 1-based line where the record starts.
        value: the parsed object (a dict for JSONL/JSON arrays; column → string for CSV).
        prefix: field-path prefix locating the record inside its container (``"[3]."`` in a JSON array).
    """

    line: int
    value: Any
    prefix: str = ""


def container_of(path: Path, head: bytes) -> str:
    """``"csv"``, ``"json-array"`` or ``"jsonl"``, from the file name and its first bytes."""
    if path.suffix.lower() == ".csv":
        return "csv"
    if head.lstrip(codecs.BOM_UTF8 + b" \t\r\n").startswith(b"["):
        return "json-array"
    return "jsonl"


def read_records(path: str | Path, problems: Problems) -> Iterator[Record]:
    """Yield the records of ``path``; problems of the file itself go into ``problems``.

    Raises:
        NotFoundError: the file does not exist or is a folder.
    """
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"data file {path} does not exist", "check the path", param="training_file")
    if path.is_dir():
        raise NotFoundError(f"{path} is a folder, not a data file", "pass a .jsonl, .json or .csv file",
                            param="training_file")
    with path.open("rb") as handle:
        head = handle.read(SNIFF_BYTES)
    if not _readable_text(head, problems):
        return
    kind = container_of(path, head)
    if kind == "csv":
        yield from _read_csv(path, problems)
    elif kind == "json-array":
        yield from _read_json_array(path, problems)
    else:
        yield from _read_jsonl(path, problems)


def _readable_text(head: bytes, problems: Problems) -> bool:
    """Reject empty, UTF-16/32 and binary files up front (their lines mean nothing)."""
    if not head.strip(codecs.BOM_UTF8 + b" \t\r\n"):
        problems.add(1, None, "the file is empty", "add training examples, " + JSONL_FIX)
        return False
    for bom, name in ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
                      (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16")):
        if head.startswith(bom):
            problems.add(1, None, f"the file is {name} encoded, not UTF-8", UTF8_FIX)
            return False
    nul = head.find(b"\0")
    if nul >= 0:
        line = head.count(b"\n", 0, nul) + 1
        problems.add(line, None, f"binary data (a NUL byte at byte {nul + 1}): this is not a text file",
                     "pass a UTF-8 JSONL, JSON or CSV file")
        return False
    return True


def _decode_line(raw: bytes, line: int, problems: Problems) -> str | None:
    """The UTF-8 text of one line, or None (with a problem) when it is not UTF-8 / has NUL bytes."""
    if b"\0" in raw:
        problems.add(line, None, "binary data (NUL bytes) in this line", "pass a UTF-8 text file")
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.add(line, None, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})",
                     UTF8_FIX)
        return None


def _physical_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based number, bytes without the line end) for each line; the BOM of line 1 removed."""
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            yield number, raw.rstrip(b"\r\n")


def _read_jsonl(path: Path, problems: Problems) -> Iterator[Record]:
    for number, raw in _physical_lines(path):
        if not raw.strip():
            continue
        text = _decode_line(raw, number, problems)
        if text is None:
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            problems.add(number, None, f"not valid JSON ({exc.msg} at column {exc.colno})", JSONL_FIX)
            continue
        if not isinstance(value, dict):
            problems.add(number, None, f"the line is {describe_type(value)}, not a JSON object", JSONL_FIX)
            continue
        yield Record(number, value)


def _read_json_array(path: Path, problems: Problems) -> Iterator[Record]:
    """Walk the array element by element so each record knows the line it starts on.

    A JSON array cannot be streamed with the standard library, so the text is held
    in memory; JSONL is the format for large files.
    """
    raw = path.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        problems.add(line, None, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {column})", UTF8_FIX)
        return
    decoder = json.JSONDecoder()
    pos = _skip_space(text, 0)
    pos += 1  # the "[" that made this a JSON array
    index = 0
    line, counted = 1, 0
    while True:
        pos = _skip_space(text, pos)
        if pos < len(text) and text[pos] == "]" and index == 0:
            break
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            problems.add(exc.lineno, f"[{index}]", f"not valid JSON ({exc.msg} at column {exc.colno})",
                         "the file must be one JSON array of objects: [{…}, {…}]")
            return
        if isinstance(value, dict):
            yield Record(line, value, prefix=f"[{index}].")
        else:
            problems.add(line, f"[{index}]", f"the element is {describe_type(value)}, not a JSON object",
                         "each element of the array must be one example object")
        index += 1
        pos = _skip_space(text, end)
        if pos < len(text) and text[pos] == ",":
            pos += 1
            continue
        if pos < len(text) and text[pos] == "]":
            break
        where = text.count("\n", 0, pos) + 1
        problems.add(where, None, "expected ',' or ']' after an element of the JSON array",
                     "the file must be one JSON array of objects: [{…}, {…}]")
        return
    rest = _skip_space(text, pos + 1)
    if rest < len(text):
        problems.add(text.count("\n", 0, rest) + 1, None, "extra text after the closing ']' of the JSON array",
                     "remove it, or use JSONL (one object per line)")


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _read_csv(path: Path, problems: Problems) -> Iterator[Record]:
    """CSV rows as {column: value} records; the header names the columns (case-insensitive)."""
    current = [0]

    def lines() -> Iterator[str]:
        for number, raw in _physical_lines(path):
            current[0] = number
            text = _decode_line(raw, number, problems)
            yield (text if text is not None else "") + "\n"

    reader = csv.reader(lines())
    try:
        header = next(reader, None)
        if header is None:
            problems.add(1, None, "the CSV file has no header row", "start with a header: prompt,completion")
            return
        columns = [name.strip().lower() for name in header]
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            if not any(cell.strip() for cell in row):
                continue
            # a quoted field may span lines: the row started that many lines before the last one read
            line = current[0] - sum(cell.count("\n") for cell in row)
            if len(row) != len(columns):
                problems.add(line, None, f"the row has {len(row)} fields but the header has {len(columns)}",
                             "quote fields that contain commas or line breaks")
                continue
            yield Record(line, dict(zip(columns, row)))
    except csv.Error as exc:
        problems.add(current[0], None, f"unreadable CSV ({exc})", "check the quoting of this row")

