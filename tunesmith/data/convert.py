"""Convert a data file in any supported format to normalised OpenAI chat JSONL."""

from __future__ import annotations

import json
from pathlib import Path

from tunesmith.atomic import atomic_file
from tunesmith.data.examples import MIN_EXAMPLES, ExampleStream, raise_problems


def convert_file(source: str | Path, target: str | Path, *, min_examples: int = MIN_EXAMPLES) -> tuple[int, str]:
    """Stream ``source`` into ``target`` as OpenAI chat JSONL, atomically.

    Nothing is written when the source has any problem: the temporary file is removed.

    Returns:
        (examples written, the source format's title).

    Raises:
        DataError: the source has problems (all of them listed).
        NotFoundError: the source does not exist.
    """
    stream = ExampleStream(source)
    count = 0
    with atomic_file(Path(target), "w", encoding="utf-8", newline="\n") as handle:
        for example in stream:
            handle.write(json.dumps(example.to_record(), ensure_ascii=False) + "\n")
            count += 1
        stream.finish(min_examples)
        raise_problems(stream.problems)  # leaves the block with an error: the temp file is discarded
    return count, stream.format.title if stream.format else "unknown"
