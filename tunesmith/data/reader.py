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
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from tunesmith.data.problems import Problems, describe_type
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


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
SURROGATE_PROBLEM = "a string holds a lone UTF-16 surrogate escape (like \\ud800), not text"
SURROGATE_FIX = "write characters as UTF-8 or as complete \\u escape pairs"


def parse_json(text: str, line: int, problems: Problems, fix: str, field_path: str | None = None):
    """``json.loads`` that reports instead of raising; returns ``_INVALID`` on failure.

    Also refused: nesting too deep for the parser, and lone UTF-16 surrogates
    (``"\\ud800"``), which are not text and cannot be tokenized or written as UTF-8.
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        problems.add(line, field_path, f"not valid JSON ({exc.msg} at column {exc.colno})", fix)
        return _INVALID
    except RecursionError:
        problems.add(line, field_path, "JSON nested too deeply to read", fix)
        return _INVALID
    if _SURROGATE_ESCAPE.search(text) and not _encodable(value):
        problems.add(line, field_path, SURROGATE_PROBLEM, SURROGATE_FIX)
        return _INVALID
    return value


_INVALID = object()


def _encodable(value) -> bool:
    """Whether every string in a JSON value can be encoded as UTF-8."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def _read_jsonl(path: Path, problems: Problems) -> Iterator[Record]:
    first = True
    for number, raw in _physical_lines(path):
        if not raw.strip():
            continue
        text = _decode_line(raw, number, problems)
        if text is None:
            continue
        if first and _is_one_multiline_object(path, text):
            problems.add(1, None, "the file is one JSON object spread over several lines, not JSONL",
                         "put one example per line (JSONL), or put the examples in a JSON array [{…}, {…}]")
            return
        first = False
        value = parse_json(text, number, problems, JSONL_FIX)
        if value is _INVALID:
            continue
        if not isinstance(value, dict):
            problems.add(number, None, f"the line is {describe_type(value)}, not a JSON object", JSONL_FIX)
            continue
        yield Record(number, value)


def _is_one_multiline_object(path: Path, first_line: str) -> bool:
    """A pretty-printed single object (``{`` alone on line 1): one problem, not one per line."""
    if first_line.strip() not in ("{", '{"') and not first_line.rstrip().endswith((",", "[", "{")):
        return False
    try:
        json.loads(path.read_bytes().decode("utf-8-sig"))
    except (ValueError, RecursionError):  # not one JSON document: report line by line
        return False
    return True


def _read_json_array(path: Path, problems: Problems) -> Iterator[Record]:
    """Walk the array element by element so each record knows the line it starts on.

    A JSON array cannot be streamed with the standard library, so the text is held
    in memory; JSONL is the format for large files.
    """
    array_fix = "the file must be one JSON array of objects: [{…}, {…}]"
    text = _decode_whole(path, problems)
    if text is None:
        return
    decoder = json.JSONDecoder()
    pos = _skip_space(text, 0) + 1  # past the "[" that made this a JSON array
    index, line, counted = 0, 1, 0
    while True:
        pos = _skip_space(text, pos)
        if index == 0 and text.startswith("]", pos):
            break
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            problems.add(exc.lineno, f"[{index}]", f"not valid JSON ({exc.msg} at column {exc.colno})", array_fix)
            return
        except RecursionError:
            problems.add(line, f"[{index}]", "JSON nested too deeply to read", array_fix)
            return
        if _SURROGATE_ESCAPE.search(text, pos, end) and not _encodable(value):
            problems.add(line, f"[{index}]", SURROGATE_PROBLEM, SURROGATE_FIX)
        elif isinstance(value, dict):
            yield Record(line, value, prefix=f"[{index}].")
        else:
            problems.add(line, f"[{index}]", f"the element is {describe_type(value)}, not a JSON object",
                         "each element of the array must be one example object")
        index += 1
        pos = _skip_space(text, end)
        if text.startswith(",", pos):
            pos += 1
        elif text.startswith("]", pos):
            break
        else:
            problems.add(text.count("\n", 0, pos) + 1, None, "expected ',' or ']' after an element of the "
                         "JSON array", array_fix)
            return
    rest = _skip_space(text, pos + 1)
    if rest < len(text):
        problems.add(text.count("\n", 0, rest) + 1, None, "extra text after the closing ']' of the JSON array",
                     "remove it, or use JSONL (one object per line)")


def _decode_whole(path: Path, problems: Problems) -> str | None:
    """The whole file as text (BOM removed), or None with a problem at the line of the first bad byte."""
    raw = path.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        problems.add(line, None, f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {column})", UTF8_FIX)
        return None


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


CSV_FIX = "start the file with a header row naming the columns: prompt,completion (or instruction,input,output)"


def _read_csv(path: Path, problems: Problems) -> Iterator[Record]:
    """CSV rows as {column: value} records; the header names the columns (case-insensitive).

    The delimiter is a comma, or the semicolon / tab / bar the header uses instead.
    """
    from tunesmith.data.formats import detect

    current = [0]

    def lines() -> Iterator[str]:
        for number, raw in _physical_lines(path):
            current[0] = number
            text = _decode_line(raw, number, problems)
            yield (text if text is not None else "") + "\n"

    source = lines()
    first = next((text for text in source if text.strip()), None)
    if first is None:
        problems.add(1, None, "the CSV file has no header row", CSV_FIX)
        return
    header_line = current[0]
    delimiter = next((d for d in ",;\t|" if d in first), ",")
    reader = csv.reader(itertools.chain([first], source), delimiter=delimiter)
    try:
        columns = [name.strip().lower() for name in next(reader)]
        if detect(dict.fromkeys(columns, "")) is None:
            problems.add(header_line, None, f"the CSV header names no known columns ({', '.join(columns)})", CSV_FIX)
            return
        while True:
            line = current[0] + 1  # csv reads no further than the row it returns
            row = next(reader, None)
            if row is None:
                return
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(columns):
                problems.add(line, None, f"the row has {len(row)} field{'s' if len(row) != 1 else ''} but the "
                             f"header has {len(columns)}", "quote fields that contain the delimiter or line breaks")
                continue
            yield Record(line, dict(zip(columns, row)))
    except csv.Error as exc:
        problems.add(current[0], None, f"unreadable CSV ({exc})", "check the quoting of this row")
