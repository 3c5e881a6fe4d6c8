"""Messages as the chat template sees them: role and content strings, tools as text.

Used for rendering in training and in inference alike, so both see the same text.

Tool use. The chat templates tunesmith uses have no tool support, so tools are
rendered as text, deterministically:

* an assistant ``tool_calls`` entry becomes, after the message's own text (and a
  newline when there is text), one block per call::

      <tool_call>
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      </tool_call>

  (blocks joined by a newline; ``arguments`` parsed and re-dumped compactly with
  ``json.dumps(..., ensure_ascii=False)``, key order kept);
* a ``tool`` message is a turn of role ``tool`` holding the result text;
* the function schemas (``tools``) are appended to the system prompt as
  :data:`TOOLS_PREAMBLE` + one JSON schema per line + ``</tools>``; with no
  system message, a system message holding only that block is put first.

:func:`parse_tool_calls` turns generated text back into OpenAI ``tool_calls``.
"""

from __future__ import annotations

import json
import re
import uuid

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
TOOLS_PREAMBLE = (
    "You can call the functions below. To call one, answer with a <tool_call> block holding a JSON object "
    'with its "name" and "arguments", one block per call:\n'
    '<tool_call>\n{"name": "function_name", "arguments": {"argument": "value"}}\n</tool_call>\n'
    "Functions:\n<tools>\n"
)
TOOLS_END = "</tools>"


def drop_system(messages: list[dict]) -> list[dict]:
    """The messages without system messages (training with ``--drop-system``)."""
    return [m for m in messages if m.get("role") != "system"]


def content_text(content) -> str:
    """A message content as text: strings as they are, text parts joined, None as ""."""
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def tool_call_text(call: dict) -> str:
    """One ``<tool_call>`` block for an OpenAI tool call (arguments may be a JSON string or a dict)."""
    function = call.get("function", call)
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            pass  # validated data never gets here; a client's malformed call is shown as the string it sent
    body = json.dumps({"name": function.get("name"), "arguments": arguments if arguments is not None else {}},
                      ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{body}\n{TOOL_CALL_CLOSE}"


def assistant_text(message: dict) -> str:
    """The text of an assistant turn: its content, then its tool calls as ``<tool_call>`` blocks."""
    text = content_text(message.get("content"))
    calls = message.get("tool_calls") or []
    if not calls:
        return text
    blocks = "\n".join(tool_call_text(call) for call in calls)
    return f"{text}\n{blocks}" if text else blocks


def tools_text(tools: list[dict]) -> str:
    """The function schemas as the text appended to the system prompt."""
    schemas = "\n".join(json.dumps(tool.get("function", tool), ensure_ascii=False) for tool in tools)
    return f"{TOOLS_PREAMBLE}{schemas}\n{TOOLS_END}"


def template_messages(messages: list[dict], tools: list[dict] | None = None) -> list[dict]:
    """The messages as the chat template receives them: ``role`` and ``content`` strings only.

    Tool calls and tool schemas become text (see the module docstring).
    """
    out = []
    for message in messages:
        role = message["role"]
        text = assistant_text(message) if role == "assistant" else content_text(message.get("content"))
        out.append({"role": role, "content": text})
    if tools:
        block = tools_text(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{block}" if out[0]["content"] else block}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


_TOOL_CALL_RE = re.compile(re.escape(TOOL_CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(TOOL_CALL_CLOSE), re.S)


def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
    """Split generated assistant text into its content and OpenAI ``tool_calls``.

    Blocks whose JSON does not parse are left in the content as text.

    Returns:
        (content without the parsed blocks, stripped; tool calls with ``arguments`` as JSON strings).
    """
    calls, kept, last = [], [], 0
    for match in _TOOL_CALL_RE.finditer(text):
        try:
            body = json.loads(match.group(1))
        except json.JSONDecodeError:
            continue
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            continue
        kept.append(text[last:match.start()])
        last = match.end()
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": body["name"],
                                   "arguments": json.dumps(body.get("arguments", {}), ensure_ascii=False)}})
    kept.append(text[last:])
    return "".join(kept).strip(), calls
