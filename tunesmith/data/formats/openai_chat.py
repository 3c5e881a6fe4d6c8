"""OpenAI chat format: ``{"messages": [{"role": …, "content": …}, …], "tools": [...]}``.

The format of OpenAI's chat fine-tuning: roles system/user/assistant/tool,
assistant ``tool_calls`` whose ``arguments`` are JSON strings, an optional
``weight`` (0|1) on assistant messages, optional ``tools`` (function schemas).
Content may be a string or a list of text parts, which are joined. The deprecated
function-calling fields (``functions``, assistant ``function_call``, role
``function``) are read as tools, one tool call and role ``tool``.
"""

from __future__ import annotations

from tunesmith.data.formats.base import Normalised, check_weight, text_content
from tunesmith.data.formats.conversation import (
    ROLES,
    check_conversation,
    check_function_call,
    check_tool_calls,
    check_tools,
)
from tunesmith.data.problems import LineProblems, describe_type

ROLE_FIX = "use system, user, assistant or tool"
LEGACY_ROLES = {"function": "tool"}  # OpenAI's deprecated function-calling format
ASSISTANT_FIX = 'add the answer to learn: {"role": "assistant", "content": "…"}'


class OpenAIChat:
    name = "openai-chat"
    title = "OpenAI chat"
    example = '{"messages": [{"role": "user", "content": "…"}, {"role": "assistant", "content": "…"}]}'

    def matches(self, record: dict) -> bool:
        return "messages" in record

    def normalise(self, record: dict, issues: LineProblems) -> Normalised | None:
        before = issues.count
        raw = record["messages"]
        if not isinstance(raw, list):
            issues.add("messages", f"must be an array of messages, got {describe_type(raw)}",
                       'use "messages": [{"role": "user", "content": "…"}, …]')
            return None
        if not raw:
            issues.add("messages", "is empty", "add at least a user message and an assistant message")
            return None
        messages = [normalise_message(m, f"messages[{i}]", issues) for i, m in enumerate(raw)]
        tools = _tools(record, issues)
        if issues.count > before:
            return None
        if not check_conversation(messages, [f"messages[{i}]" for i in range(len(messages))], "messages",
                                  issues, assistant_fix=ASSISTANT_FIX):
            return None
        return Normalised(messages, tools)


def _tools(record: dict, issues: LineProblems) -> list[dict] | None:
    """``tools``, or the deprecated ``functions`` (bare function schemas) in the ``tools`` shape."""
    if record.get("tools") is not None:
        return check_tools(record["tools"], "tools", issues)
    functions = record.get("functions")
    if functions is None:
        return None
    if not isinstance(functions, list):
        issues.add("functions", f"must be an array of function schemas, got {describe_type(functions)}",
                   'use "tools": [{"type": "function", "function": {"name": "…", "parameters": {…}}}]')
        return None
    return check_tools([{"type": "function", "function": f} if isinstance(f, dict) else f for f in functions],
                       "functions", issues)


def normalise_message(raw, path: str, issues: LineProblems) -> dict | None:
    """One OpenAI chat message, checked field by field; None if it has problems."""
    if _plain(raw):
        return {"role": raw["role"], "content": raw["content"]}
    if not isinstance(raw, dict):
        issues.add(path, f"a message must be an object, got {describe_type(raw)}",
                   'use {"role": "user", "content": "…"}')
        return None
    before = issues.count
    role = raw.get("role")
    if role is None:
        issues.add(f"{path}.role", "missing", ROLE_FIX)
        return None
    if not isinstance(role, str):
        issues.add(f"{path}.role", f"must be a string, got {describe_type(role)}", ROLE_FIX)
        return None
    role = LEGACY_ROLES.get(role, role)
    if role not in ROLES:
        issues.add(f"{path}.role", f'unknown role "{role}"', ROLE_FIX)
        return None
    message: dict = {"role": role}
    calls = _tool_calls(raw, path, role, issues)
    content = raw.get("content")
    if content is None:
        if calls == []:  # (None: the calls had problems, already reported)
            issues.add(f"{path}.content", "missing", f'give the {role} message its text: "content": "…"')
        text = ""
    else:
        text = text_content(content, f"{path}.content", issues)
    if role == "assistant" and text == "" and calls == []:
        issues.add(f"{path}.content", "the assistant message is empty",
                   "give it the answer to learn, or remove the message")
    if "weight" in raw:
        if role != "assistant":
            issues.add(f"{path}.weight", f"weight is only allowed on assistant messages, this one is {role}",
                       "remove it")
        else:
            weight = check_weight(raw["weight"], f"{path}.weight", issues)
            message["weight"] = weight
    _copy_strings(raw, message, path, issues, ("name", "tool_call_id") if role == "tool" else ("name",))
    if issues.count > before:
        return None
    message["content"] = text
    if calls:
        message["tool_calls"] = calls
    return _ordered(message)


PLAIN_ROLES = frozenset(("system", "user", "assistant"))


def _plain(raw) -> bool:
    """Whether ``raw`` is exactly ``{"role": system|user|assistant, "content": non-empty string}``,
    which normalises to a copy of itself.

    Why: nearly every message of a real file has this shape, and the field-by-field
    checks cost more than parsing its JSON; any other shape takes the full path.
    """
    return (type(raw) is dict and len(raw) == 2 and type(raw.get("content")) is str and raw["content"] != ""
            and type(raw.get("role")) is str and raw["role"] in PLAIN_ROLES)


def _tool_calls(raw: dict, path: str, role: str, issues: LineProblems) -> list[dict] | None:
    """The message's tool calls in OpenAI's shape: [] when it makes none, None when they have problems.

    An empty ``tool_calls`` array means no calls; the deprecated ``function_call`` object is one call.
    """
    value, legacy = raw.get("tool_calls"), raw.get("function_call")
    if (value is None or value == []) and legacy is None:
        return []
    if role != "assistant":
        key = "tool_calls" if value else "function_call"
        issues.add(f"{path}.{key}", f"only assistant messages make tool calls, this one is {role}",
                   "move the call to an assistant message")
        return None
    if value:
        return check_tool_calls(value, f"{path}.tool_calls", issues)
    return check_function_call(legacy, f"{path}.function_call", issues)


def _copy_strings(raw: dict, message: dict, path: str, issues: LineProblems, keys: tuple[str, ...]) -> None:
    for key in keys:
        value = raw.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            message[key] = value
        else:
            issues.add(f"{path}.{key}", f"must be a string, got {describe_type(value)}", "write it as a string")


def _ordered(message: dict) -> dict:
    """role and content first, for readable converted files."""
    head = {"role": message["role"], "content": message["content"]}
    return {**head, **{k: v for k, v in message.items() if k not in head}}
