"""ShareGPT format: ``{"conversations": [{"from": "human", "value": "…"}, {"from": "gpt", "value": "…"}]}``.

Speakers map to OpenAI roles (``human``/``user`` → user, ``gpt``/``assistant``/
``model`` → assistant, ``system`` → system, ``tool``/``observation``/
``function_response`` → tool). A ``function_call`` turn holds a JSON
``{"name": …, "arguments": {…}}`` and becomes an assistant tool call. A top-level
``system`` string and ``tools`` (an array, or a JSON string of one) are read
too, as LLaMA-Factory writes them; ``weight`` (0|1) on a turn is kept.
"""

from __future__ import annotations

import json

from tunesmith.data.formats.base import Normalised, check_weight, optional_string, text_content
from tunesmith.data.formats.conversation import check_conversation, check_tools
from tunesmith.data.problems import LineProblems, describe_type

SPEAKERS = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "model": "assistant", "chatgpt": "assistant",
    "system": "system",
    "tool": "tool", "observation": "tool", "function_response": "tool",
    "function_call": "assistant",
}
SPEAKER_FIX = "use human, gpt, system, function_call or observation (or user, assistant, tool)"


class ShareGPT:
    name = "sharegpt"
    title = "ShareGPT"
    example = '{"conversations": [{"from": "human", "value": "…"}, {"from": "gpt", "value": "…"}]}'

    def matches(self, record: dict) -> bool:
        return "conversations" in record

    def normalise(self, record: dict, issues: LineProblems) -> Normalised | None:
        before = issues.count
        turns = record["conversations"]
        if not isinstance(turns, list):
            issues.add("conversations", f"must be an array of turns, got {describe_type(turns)}",
                       'use "conversations": [{"from": "human", "value": "…"}, …]')
            return None
        if not turns:
            issues.add("conversations", "is empty", "add at least a human turn and a gpt turn")
            return None
        messages, paths = [], []
        system = optional_string(record, "system", issues)
        if system and system.strip():
            messages.append({"role": "system", "content": system})
            paths.append("system")
        for i, turn in enumerate(turns):
            message = _normalise_turn(turn, f"conversations[{i}]", issues, len(messages))
            messages.append(message)
            paths.append(f"conversations[{i}]")
        tools = _tools(record.get("tools"), issues)
        if issues.count > before:
            return None
        if not check_conversation(messages, paths, "conversations", issues,
                                  assistant_fix='add the answer to learn: {"from": "gpt", "value": "…"}'):
            return None
        return Normalised(messages, tools)


def _normalise_turn(turn, path: str, issues: LineProblems, index: int) -> dict | None:
    if not isinstance(turn, dict):
        issues.add(path, f"a turn must be an object, got {describe_type(turn)}", 'use {"from": "human", "value": "…"}')
        return None
    speaker = turn.get("from")
    if speaker is None:
        issues.add(f"{path}.from", "missing", SPEAKER_FIX)
        return None
    if not isinstance(speaker, str):
        issues.add(f"{path}.from", f"must be a string, got {describe_type(speaker)}", SPEAKER_FIX)
        return None
    if speaker.lower() not in SPEAKERS:
        issues.add(f"{path}.from", f'unknown speaker "{speaker}"', SPEAKER_FIX)
        return None
    speaker = speaker.lower()
    if turn.get("value") is None:
        issues.add(f"{path}.value", "missing", 'give the turn its text: "value": "…"')
        return None
    text = text_content(turn["value"], f"{path}.value", issues)
    if text is None:
        return None
    role = SPEAKERS[speaker]
    message: dict = {"role": role, "content": text}
    if speaker == "function_call":
        call = _function_call(text, f"{path}.value", issues, index)
        if call is None:
            return None
        message = {"role": "assistant", "content": "", "tool_calls": [call]}
    elif role == "assistant" and not text.strip():
        issues.add(f"{path}.value", "the gpt turn is empty", "give it the answer to learn, or remove the turn")
        return None
    if "weight" in turn:
        if role != "assistant":
            issues.add(f"{path}.weight", f"weight is only allowed on assistant (gpt) turns, this one is {speaker}",
                       "remove it")
            return None
        weight = check_weight(turn["weight"], f"{path}.weight", issues)
        if weight is None:
            return None
        message["weight"] = weight
    return message


def _function_call(text: str, path: str, issues: LineProblems, index: int) -> dict | None:
    fix = 'a function_call turn holds JSON like {"name": "get_weather", "arguments": {"city": "Paris"}}'
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        issues.add(path, f"function_call is not valid JSON ({exc.msg} at column {exc.colno})", fix)
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"].strip():
        issues.add(path, "function_call needs a JSON object with a name", fix)
        return None
    arguments = value.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            issues.add(path, f"function_call arguments are not valid JSON ({exc.msg})", fix)
            return None
    if not isinstance(arguments, dict):
        issues.add(path, f"function_call arguments must be an object, got {describe_type(arguments)}", fix)
        return None
    return {"id": f"call_{index}", "type": "function",
            "function": {"name": value["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}}


def _tools(value, issues: LineProblems) -> list[dict] | None:
    if value is None:
        return None
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            issues.add("tools", f"not valid JSON ({exc.msg} at column {exc.colno})",
                       "give tools as an array of function schemas, or a JSON string of one")
            return None
    if isinstance(value, list) and value and all(isinstance(t, dict) and "function" not in t for t in value):
        value = [{"type": "function", "function": t} for t in value]  # LLaMA-Factory lists bare functions
    return check_tools(value, "tools", issues)
