"""Checks on a whole normalised conversation, shared by the chat-shaped formats.

Per-message field checks belong to each format (their field names differ);
what makes a conversation trainable is the same for all of them.
"""

from __future__ import annotations

import json

from tunesmith.data.problems import LineProblems, describe_type

ROLES = ("system", "user", "assistant", "tool")


def check_conversation(messages: list[dict], paths: list[str], container: str, issues: LineProblems,
                       *, assistant_fix: str) -> bool:
    """Check the turn structure of normalised ``messages``.

    Args:
        messages: normalised messages (role, content, ...).
        paths: the field path of each message in the user's record (``messages[3]``).
        container: the field holding the list (``messages``), for record-level problems.
        issues: where problems go.
        assistant_fix: how to add an assistant turn, in this format's words.

    Returns:
        True when there were no problems.
    """
    before = issues.count
    if not any(m["role"] == "assistant" for m in messages):
        issues.add(container, "no assistant message to learn from", assistant_fix)
    open_calls: set[str] | None = None  # ids of the tool calls the latest assistant turn made
    for message, path in zip(messages, paths):
        role = message["role"]
        if role == "assistant":
            calls = message.get("tool_calls") or []
            open_calls = {c["id"] for c in calls if c.get("id")} if calls else None
        elif role == "tool":
            if open_calls is None:
                issues.add(path, "a tool result with no assistant tool call before it",
                           "put the assistant message with the matching tool_calls right before it")
            elif message.get("tool_call_id") and open_calls and message["tool_call_id"] not in open_calls:
                issues.add(f"{path}.tool_call_id", f'"{message["tool_call_id"]}" matches no tool call of the '
                           "assistant message before it", "use the id of one of its tool_calls")
        else:
            open_calls = None
    return issues.count == before


def check_tool_calls(value, path: str, issues: LineProblems) -> list[dict] | None:
    """Validate assistant ``tool_calls`` and return them in OpenAI's shape (arguments a JSON string)."""
    if not isinstance(value, list) or not value:
        issues.add(path, f"must be a non-empty array of tool calls, got {describe_type(value)}",
                   'use [{"id": "call_1", "type": "function", "function": {"name": "…", "arguments": "{…}"}}]')
        return None
    calls, ok = [], True
    for i, call in enumerate(value):
        where = f"{path}[{i}]"
        if not isinstance(call, dict):
            issues.add(where, f"a tool call must be an object, got {describe_type(call)}",
                       'use {"type": "function", "function": {"name": "…", "arguments": "{…}"}}')
            ok = False
            continue
        if call.get("type", "function") != "function":
            issues.add(f"{where}.type", f'unsupported tool call type {json.dumps(call.get("type"))}',
                       'use "function"')
            ok = False
        function = call.get("function")
        if not isinstance(function, dict):
            issues.add(f"{where}.function", "missing" if function is None else
                       f"must be an object, got {describe_type(function)}",
                       'add "function": {"name": "…", "arguments": "{…}"}')
            ok = False
            continue
        name = function.get("name")
        if not isinstance(name, str) or not name.strip():
            issues.add(f"{where}.function.name", "missing or empty" if not isinstance(name, str) or name == ""
                       else "is blank", "give the name of the function called")
            ok = False
        arguments = _check_arguments(function.get("arguments"), f"{where}.function.arguments", issues)
        ok = ok and arguments is not None
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            issues.add(f"{where}.id", f"must be a string, got {describe_type(call_id)}", 'use an id like "call_1"')
            ok = False
        normalised = {"type": "function", "function": {"name": name, "arguments": arguments}}
        if call_id is not None:
            normalised = {"id": call_id, **normalised}
        calls.append(normalised)
    return calls if ok else None


def check_function_call(value, path: str, issues: LineProblems) -> list[dict] | None:
    """The deprecated assistant ``function_call`` ``{"name": …, "arguments": "{…}"}`` as one tool call."""
    if not isinstance(value, dict):
        issues.add(path, f"must be an object, got {describe_type(value)}",
                   'use "tool_calls": [{"type": "function", "function": {"name": "…", "arguments": "{…}"}}]')
        return None
    name = value.get("name")
    ok = isinstance(name, str) and bool(name.strip())
    if not ok:
        issues.add(f"{path}.name", "missing or empty", "give the name of the function called")
    arguments = _check_arguments(value.get("arguments"), f"{path}.arguments", issues)
    if not ok or arguments is None:
        return None
    return [{"type": "function", "function": {"name": name, "arguments": arguments}}]


def _check_arguments(value, path: str, issues: LineProblems) -> str | None:
    """Tool-call arguments: a string holding a JSON object (as OpenAI sends them)."""
    if value is None:
        issues.add(path, "missing", 'add "arguments": "{}" (a JSON object encoded as a string)')
        return None
    if not isinstance(value, str):
        issues.add(path, f"must be a JSON string, got {describe_type(value)}",
                   "encode the arguments object as a string, e.g. json.dumps(arguments)")
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        issues.add(path, f"not valid JSON ({exc.msg} at column {exc.colno})",
                   'arguments must be a JSON object encoded as a string, e.g. "{\\"city\\": \\"Paris\\"}"')
        return None
    if not isinstance(parsed, dict):
        issues.add(path, f"must encode a JSON object, got {describe_type(parsed)}",
                   'wrap the arguments in an object: "{\\"name\\": value}"')
        return None
    return value


def check_tools(value, path: str, issues: LineProblems) -> list[dict] | None:
    """Validate function schemas (``tools``): ``[{"type": "function", "function": {"name": …}}]``."""
    fix = 'use [{"type": "function", "function": {"name": "…", "description": "…", "parameters": {…}}}]'
    if not isinstance(value, list):
        issues.add(path, f"must be an array of tools, got {describe_type(value)}", fix)
        return None
    ok = True
    for i, tool in enumerate(value):
        where = f"{path}[{i}]"
        if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict):
            issues.add(where if not isinstance(tool, dict) else f"{where}.function",
                       "a tool must be an object with a function object", fix)
            ok = False
            continue
        if tool.get("type", "function") != "function":
            issues.add(f"{where}.type", f'unsupported tool type {json.dumps(tool.get("type"))}', 'use "function"')
            ok = False
        name = tool["function"].get("name")
        if not isinstance(name, str) or not name.strip():
            issues.add(f"{where}.function.name", "missing or empty", "give the function a name")
            ok = False
        params = tool["function"].get("parameters")
        if params is not None and not isinstance(params, dict):
            issues.add(f"{where}.function.parameters", f"must be a JSON schema object, got {describe_type(params)}",
                       'use {"type": "object", "properties": {…}}')
            ok = False
    return value if ok else None
