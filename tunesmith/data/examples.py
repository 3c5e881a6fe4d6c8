"""Read a data file into normalised training examples (read → detect → normalise).

:class:`ExampleStream` is the streaming core used by ``data check`` (it never
holds the file in memory); :func:`load_examples` collects it into a list for
training and evaluation and raises one :class:`DataError` listing every problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from tunesmith.data.formats import Format, detect, unknown_record_fix
from tunesmith.data.problems import Problems
from tunesmith.data.reader import read_records
from tunesmith.errors import DataError

MIN_EXAMPLES = 10  # OpenAI's minimum for a fine-tuning file


@dataclass
class Example:
    """One training example, normalised to OpenAI chat messages.

    Attributes:
        line: 1-based line in the source file where the example starts (the row for CSV).
        messages: ``role``, ``content`` (str); ``weight`` (0|1) and ``tool_calls`` on assistant
            messages; ``tool_call_id`` / ``name`` on tool messages.
        tools: the function schemas offered to the model, if any.
    """

    line: int
    messages: list[dict]
    tools: list[dict] | None = None

    def to_record(self) -> dict:
        """The example as one OpenAI chat JSONL record."""
        record: dict = {"messages": self.messages}
        if self.tools:
            record["tools"] = self.tools
        return record


class ExampleStream:
    """Iterate the valid examples of a file while collecting the problems of the invalid ones.

    Args:
        path: the data file.
        name: how the file is named in problem messages (default: the path as given).

    Attributes:
        problems: every problem found so far (complete once iteration ends and :meth:`finish` ran).
        format: the format of the file (that of its first recognised record), or None.
        records: how many records (examples, valid or not) were read.
    """

    def __init__(self, path: str | Path, *, name: str | None = None):
        self.path = Path(path)
        self.problems = Problems(name if name is not None else str(path))
        self.format: Format | None = None
        self.format_line: int | None = None
        self.records = 0

    def __iter__(self) -> Iterator[Example]:
        try:
            yield from self._examples()
        except (OSError, MemoryError) as exc:  # unreadable file (permissions, I/O), or a line too large
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise DataError(f"cannot read {self.problems.name}: {reason}",
                            hint="check that the file is readable and is a text data file") from exc

    def _examples(self) -> Iterator[Example]:
        for record in read_records(self.path, self.problems):
            self.records += 1
            issues = self.problems.at(record.line, record.prefix)
            fmt = detect(record.value)
            if fmt is None:
                keys = ", ".join(sorted(record.value)[:8]) or "none"
                issues.add(None, f"not a training example in a known format (its keys: {keys})",
                           unknown_record_fix())
                continue
            if self.format is None:
                self.format, self.format_line = fmt, record.line
            elif fmt is not self.format:
                issues.add(None, f"this example is {fmt.title}, but the file started as {self.format.title} "
                           f"(line {self.format_line})", f"use one format in a file: {self.format.example}")
                continue
            try:
                normalised = fmt.normalise(record.value, issues)
            except Exception as exc:  # a shape no check foresaw: report it at its line rather than crash
                issues.add(None, f"cannot read this example ({type(exc).__name__}: {exc})",
                           f"compare it with the {fmt.title} format: {fmt.example}")
                continue
            if normalised is not None:
                yield Example(record.line, normalised.messages, normalised.tools)

    def finish(self, min_examples: int = MIN_EXAMPLES) -> None:
        """File-level checks once every record was read (the minimum number of examples)."""
        if 0 < self.records < min_examples:
            self.problems.add(None, None, f"only {self.records} example{'s' if self.records != 1 else ''}, "
                              f"at least {min_examples} are needed", "add more examples")
        elif self.records == 0 and not self.problems:
            self.problems.add(None, None, "no examples in the file", "add training examples")


def load_examples(path: str | Path, *, min_examples: int = MIN_EXAMPLES, name: str | None = None) -> list[Example]:
    """Read, detect and normalise every example of a data file.

    Args:
        path: a JSONL, JSON-array or CSV file in any supported format.
        min_examples: fewer examples than this is an error (evaluation sets may pass 1).
        name: how the file is named in problem messages (default: the path as given).

    Returns:
        The examples in file order.

    Raises:
        DataError: listing every problem as ``FILE:LINE: field: what — fix``.
        NotFoundError: the file does not exist.
    """
    stream = ExampleStream(path, name=name)
    examples = list(stream)
    stream.finish(min_examples)
    raise_problems(stream.problems)
    return examples


def raise_problems(problems: Problems) -> None:
    """Raise a :class:`DataError` carrying ``problems`` if there are any."""
    if not problems:
        return
    count = problems.count
    raise DataError(f"{problems.name}: {count} problem{'s' if count != 1 else ''} in the training data",
                    problems=problems.listed(),
                    hint=f"fix {'them' if count != 1 else 'it'}; `tunesmith data check {problems.name}` "
                         "shows the full report")
