"""The data layer: read → detect format → normalise to chat messages → render with the
chat template → token ids + loss mask → pack; and the validation report of ``data check``.
"""

from tunesmith.data.check import DataReport, check_file
from tunesmith.data.chat import (
    IGNORE_INDEX,
    EncodedExample,
    drop_system,
    encode_examples,
    encode_messages,
    encode_prompt,
    parse_tool_calls,
    render_prompt,
)
from tunesmith.data.examples import MIN_EXAMPLES, Example, ExampleStream, load_examples
from tunesmith.data.packing import PackedSequence, pack_examples
from tunesmith.data.stats import auto_epochs

__all__ = [
    "IGNORE_INDEX",
    "MIN_EXAMPLES",
    "DataReport",
    "EncodedExample",
    "Example",
    "ExampleStream",
    "PackedSequence",
    "auto_epochs",
    "check_file",
    "drop_system",
    "encode_examples",
    "encode_messages",
    "encode_prompt",
    "load_examples",
    "pack_examples",
    "parse_tool_calls",
    "render_prompt",
]

