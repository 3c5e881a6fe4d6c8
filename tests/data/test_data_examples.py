"""Reading, format detection, normalisation and every data error, each at its exact line."""

from __future__ import annotations

import json

import pytest

from datafiles import chat_record, good_records
from tunesmith.data import Example, load_examples
from tunesmith.data.examples import ExampleStream
from tunesmith.data.formats import FORMATS, detect
from tunesmith.errors import DataError, NotFoundError


def problems_of(path, **kwargs) -> list[str]:
    with pytest.raises(DataError) as err:
        load_examples(path, **kwargs)
    assert err.value.problems, "a DataError must list its problems"
    assert f"{len(err.value.problems)} problem" in err.value.message
    return err.value.problems


ASSISTANT = {"role": "assistant", "content": "ok"}
USER = {"role": "user", "content": "hi"}
CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}

# (bad record or raw line, expected "field: what" after "train.jsonl:7: ")
MALFORMED = [
    ({"messages": [USER, {"role": "bot", "content": "x"}]},
     'messages[1].role: unknown role "bot" — use system, user, assistant or tool'),
    ({"messages": []}, "messages: is empty"),
    ({"messages": "hi"}, "messages: must be an array of messages, got a string"),
    ({"messages": [USER, {"content": "x"}]}, "messages[1].role: missing"),
    ({"messages": [USER, {"role": ["assistant"], "content": "x"}]}, "messages[1].role: must be a string, got an array"),
    ({"messages": [{"role": "user", "content": 42}, ASSISTANT]}, "messages[0].content: must be a string, got a number"),
    ({"messages": [{"role": "user"}, ASSISTANT]}, "messages[0].content: missing"),
    ({"messages": [USER, {"role": "assistant", "content": [{"type": "image_url", "image_url": {}}]}]},
     'messages[1].content[0].type: unsupported content part type "image_url"'),
    ({"messages": [USER, {"role": "user", "content": "more"}]}, "messages: no assistant message to learn from"),
    ({"messages": [USER, {"role": "assistant", "content": ""}]}, "messages[1].content: the assistant message is empty"),
    ({"messages": [USER, {**ASSISTANT, "weight": 2}]}, "messages[1].weight: weight must be 0 or 1, got 2"),
    ({"messages": [USER, {**ASSISTANT, "weight": True}]}, "messages[1].weight: weight must be 0 or 1, got true"),
    ({"messages": [USER, {**ASSISTANT, "weight": 0.5}]}, "messages[1].weight: weight must be 0 or 1, got 0.5"),
    ({"messages": [{**USER, "weight": 1}, ASSISTANT]},
     "messages[0].weight: weight is only allowed on assistant messages"),
    ({"messages": [USER, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{city: Paris}"}}]}]},
     "messages[1].tool_calls[0].function.arguments: not valid JSON"),
    ({"messages": [USER, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]}]},
     "messages[1].tool_calls[0].function.arguments: must be a JSON string, got an object"),
    ({"messages": [USER, {"role": "assistant", "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]}]},
     "messages[1].tool_calls[0].function.name: missing or empty"),
    ({"messages": [USER, {"role": "assistant", "function_call": {"name": "f", "arguments": "nope"}}]},
     "messages[1].function_call.arguments: not valid JSON"),
    ({"messages": [USER, {"role": "assistant", "content": "", "tool_calls": []}]},
     "messages[1].content: the assistant message is empty"),
    ({"messages": [USER, {"role": "tool", "content": "42"}, ASSISTANT]},
     "messages[1]: a tool result with no assistant tool call before it"),
    ({"messages": [USER, {"role": "assistant", "tool_calls": [CALL]},
                   {"role": "tool", "tool_call_id": "c9", "content": "1"}, ASSISTANT]},
     'messages[2].tool_call_id: "c9" matches no tool call'),
    ({"messages": [USER, ASSISTANT], "tools": {"name": "f"}}, "tools: must be an array of tools, got an object"),
    ({"prompt": "a", "completion": "b"}, "this example is prompt/completion, but the file started as OpenAI chat (line 1)"),
    ({"text": "hello"}, "not a training example in a known format (its keys: text)"),
    ("{not json", "not valid JSON (Expecting property name enclosed in double quotes at column 2)"),
    ('{"messages": [', "not valid JSON"),
    ("[1, 2]", "the line is an array, not a JSON object"),
    ('"just a string"', "the line is a string, not a JSON object"),
    ("null", "the line is null, not a JSON object"),
    ('{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}", "JSON nested too deeply to read"),
    ('{"messages": [{"role": "user", "content": "\\ud800"}, {"role": "assistant", "content": "a"}]}',
     "a string holds a lone UTF-16 surrogate escape"),
]


@pytest.mark.parametrize("bad,expected", MALFORMED, ids=[e.split(":")[0][:40] for _, e in MALFORMED])
def test_each_malformed_record_is_reported_at_its_line(with_bad_line, bad, expected):
    path = with_bad_line(bad, at=7)
    problems = problems_of(path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}:7: {expected}"), problems[0]
    assert " — " in problems[0], "every problem says how to fix it"


def test_issue_example_message_is_exact(with_bad_line):
    record = {"messages": [{"role": "system", "content": "s"}, USER, {"role": "bot", "content": "x"}]}
    problems = problems_of(with_bad_line(record, at=7), name="train.jsonl")
    assert problems == ['train.jsonl:7: messages[2].role: unknown role "bot" — use system, user, assistant or tool']


def test_every_problem_is_reported_at_once(write):
    lines = [json.dumps(r) for r in good_records(12)]
    lines[2] = json.dumps({"messages": [USER, {"role": "bot", "content": "x"}]})
    lines[5] = "nope"
    lines[9] = json.dumps({"messages": [{"role": "user", "content": 1}, {**ASSISTANT, "weight": 3}]})
    problems = problems_of(write("t.jsonl", "\n".join(lines)))
    assert [p.split(": ")[0].rsplit(":", 1)[1] for p in problems] == ["3", "6", "10", "10"]


def test_too_few_examples(write):
    problems = problems_of(write("few.jsonl", good_records(7)), name="few.jsonl")
    assert problems == ["few.jsonl: only 7 examples, at least 10 are needed — add more examples"]
    assert len(load_examples(write("few.jsonl", good_records(7)), min_examples=1)) == 7


@pytest.mark.parametrize("content,expected", [
    (b"", "t.jsonl:1: the file is empty"),
    (b"\n\n  \r\n", "t.jsonl:1: the file is empty"),
    (b'{"a": 1}\n\x00\x01\x02\xff' * 3, "t.jsonl:2: binary data (a NUL byte at byte 10)"),
    ("\ufeff".encode("utf-16-le") + '{"messages": []}'.encode("utf-16-le"), "t.jsonl:1: the file is UTF-16 encoded"),
])
def test_unreadable_files(write, content, expected):
    problems = problems_of(write("t.jsonl", content), name="t.jsonl")
    assert len(problems) == 1 and problems[0].startswith(expected), problems


def test_invalid_utf8_is_reported_at_its_line(write):
    lines = [json.dumps(r).encode() for r in good_records(12)]
    lines[4] = b'{"prompt": "caf\xe9"}'
    problems = problems_of(write("t.jsonl", b"\n".join(lines)), name="t.jsonl")
    assert problems == ["t.jsonl:5: not valid UTF-8 (byte 0xe9 at column 16) — save the file as UTF-8"]


def test_bom_crlf_and_blank_lines(write):
    body = "\r\n\r\n".join(json.dumps(r, ensure_ascii=False) for r in good_records(12)) + "\r\n"
    examples = load_examples(write("t.jsonl", "\ufeff" + body))
    assert len(examples) == 12
    assert [e.line for e in examples[:3]] == [1, 3, 5]
    assert examples[0].messages == chat_record(0)["messages"]


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(NotFoundError, match="does not exist"):
        load_examples(tmp_path / "nope.jsonl")
    with pytest.raises(NotFoundError, match="is a folder"):
        load_examples(tmp_path)


# --- formats -------------------------------------------------------------------------------------

def test_legacy_function_calling_and_empty_tool_calls(write):
    record = {
        "functions": [{"name": "f", "parameters": {"type": "object"}}],
        "messages": [
            {"role": "user", "content": "x?"},
            {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": '{"x": 1}'}},
            {"role": "function", "name": "f", "content": "2"},
            {"role": "assistant", "content": "It is 2.", "tool_calls": []},
        ],
    }
    ex = load_examples(write("t.jsonl", [record] * 10))[0]
    assert ex.tools == [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert ex.messages[1] == {"role": "assistant", "content": "",
                              "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]}
    assert ex.messages[2] == {"role": "tool", "content": "2", "name": "f"}
    assert ex.messages[3] == {"role": "assistant", "content": "It is 2."}


def test_openai_chat_with_tools_parts_and_weights(write):
    record = {
        "messages": [
            {"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "nice."}]},
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "Let me look.", "weight": 0},
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "c1", "name": "f", "content": "sunny"},
            {"role": "assistant", "content": "Sunny.", "weight": 1},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    }
    examples = load_examples(write("t.jsonl", [record] + good_records(9)))
    ex = examples[0]
    assert ex.line == 1 and ex.tools == record["tools"]
    assert ex.messages[0] == {"role": "system", "content": "Be nice."}
    assert ex.messages[2]["weight"] == 0
    assert ex.messages[3] == {"role": "assistant", "content": "", "tool_calls": [CALL]}
    assert ex.messages[4] == {"role": "tool", "content": "sunny", "name": "f", "tool_call_id": "c1"}


EXPECTED_PAIR = [{"role": "user", "content": "Q0"}, {"role": "assistant", "content": "A0"}]


@pytest.mark.parametrize("fmt,record", [
    ("prompt-completion", {"prompt": "Q0", "completion": "A0"}),
    ("alpaca", {"instruction": "Q0", "input": "", "output": "A0"}),
    ("sharegpt", {"conversations": [{"from": "human", "value": "Q0"}, {"from": "gpt", "value": "A0"}]}),
    ("openai-chat", {"messages": EXPECTED_PAIR}),
])
def test_each_format_is_detected_and_normalised(write, fmt, record):
    assert detect(record).name == fmt
    records = [json.loads(json.dumps(record).replace("0", str(i))) for i in range(10)]
    examples = load_examples(write("t.jsonl", records))
    assert examples[0].messages == EXPECTED_PAIR
    assert examples[3].messages[1]["content"] == "A3"


def test_alpaca_with_input_and_system(write):
    records = [{"instruction": "Translate", "input": f"chat {i}", "output": f"cat {i}", "system": "You translate."}
               for i in range(10)]
    ex = load_examples(write("t.jsonl", records))[1]
    assert ex.messages == [{"role": "system", "content": "You translate."},
                           {"role": "user", "content": "Translate\n\nchat 1"},
                           {"role": "assistant", "content": "cat 1"}]


def test_sharegpt_system_tools_and_function_calls(write):
    record = {
        "system": "Use tools.",
        "tools": json.dumps([{"name": "f", "parameters": {"type": "object"}}]),
        "conversations": [
            {"from": "human", "value": "x?"},
            {"from": "function_call", "value": json.dumps({"name": "f", "arguments": {"x": 1}})},
            {"from": "observation", "value": "2"},
            {"from": "gpt", "value": "It is 2.", "weight": 1},
        ],
    }
    ex = load_examples(write("t.jsonl", [record] * 10))[0]
    assert [m["role"] for m in ex.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert ex.messages[2]["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"x": 1}'}
    assert ex.tools == [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize("bad,expected", [
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
     'conversations[1].from: unknown speaker "bot"'),
    ({"conversations": [{"from": "human", "value": "q"}]}, "conversations: no assistant message to learn from"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": 3}]},
     "conversations[1].value: must be a string, got a number"),
    ({"instruction": "q"}, "output: missing"),
    ({"instruction": "q", "output": "  "}, "output: is empty"),
    ({"prompt": "q", "completion": ["a"]}, "completion: must be a string, got an array"),
])
def test_format_specific_errors(write, bad, expected):
    fmt_records = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]} \
        if "conversations" in bad else ({"instruction": "q", "output": "a"} if "instruction" in bad
                                        else {"prompt": "q", "completion": "a"})
    lines = [json.dumps(fmt_records)] * 11
    lines.insert(3, json.dumps(bad))
    problems = problems_of(write("t.jsonl", "\n".join(lines)), name="t.jsonl")
    assert len(problems) == 1 and problems[0].startswith(f"t.jsonl:4: {expected}"), problems


def test_registry_lists_every_format():
    assert [f.name for f in FORMATS] == ["openai-chat", "sharegpt", "alpaca", "prompt-completion"]


# --- containers ----------------------------------------------------------------------------------

def test_json_array_records_know_their_lines(write):
    records = good_records(11)
    text = "[\n" + ",\n".join(json.dumps(r, indent=1) for r in records) + "\n]\n"
    examples = load_examples(write("t.json", text))
    assert len(examples) == 11
    first_lines = [i + 1 for i, line in enumerate(text.splitlines()) if line == "{"]
    assert [e.line for e in examples] == first_lines


def test_json_array_errors(write):
    records = [json.dumps(r) for r in good_records(11)]
    records[4] = json.dumps({"messages": [USER, {"role": "bot", "content": "x"}]})
    problems = problems_of(write("t.json", "[\n" + ",\n".join(records) + "\n]"), name="t.json")
    assert problems == ['t.json:6: [4].messages[1].role: unknown role "bot" — use system, user, assistant or tool']
    records[4] = '{"prompt": "\\udc80 lone", "completion": "x"}'
    problems = problems_of(write("t.json", "[\n" + ",\n".join(records) + "\n]"), name="t.json")
    assert problems == ["t.json:6: [4]: a string holds a lone UTF-16 surrogate escape (like \\ud800), not text — "
                        "write characters as UTF-8 or as complete \\u escape pairs"]
    broken = "[\n" + ",\n".join(records[:3]) + ",\n{oops}\n]"
    problems = problems_of(write("t.json", broken), name="t.json")
    assert problems[0].startswith("t.json:5: [3]: not valid JSON")


def test_a_pretty_printed_object_is_one_problem_not_one_per_line(write):
    problems = problems_of(write("t.json", json.dumps(chat_record(1), indent=2)), name="t.json")
    assert problems == ["t.json:1: the file is one JSON object spread over several lines, not JSONL — put one "
                        "example per line (JSONL), or put the examples in a JSON array [{…}, {…}]"]


def test_csv_prompt_completion(write):
    rows = ["Prompt,Completion"] + [f'"Say ""{i}""","{i}, ok"' for i in range(9)] + ['"multi\nline",done']
    examples = load_examples(write("t.csv", "\r\n".join(rows) + "\r\n"))
    assert examples[0].messages == [{"role": "user", "content": 'Say "0"'}, {"role": "assistant", "content": "0, ok"}]
    assert examples[0].line == 2 and examples[-1].line == 11
    assert examples[-1].messages[0]["content"] == "multi\nline"


def test_csv_unterminated_quote_is_reported_where_the_row_starts(write):
    rows = ["prompt,completion"] + [f"q{i},a{i}" for i in range(11)]
    rows[4] = '"never closed,a'
    problems = problems_of(write("t.csv", "\n".join(rows) + "\n"), name="t.csv")
    assert problems[0].startswith("t.csv:5: the row has 1 field but the header has 2")


def test_csv_errors(write):
    rows = ["prompt,completion"] + [f"q{i},a{i}" for i in range(11)]
    rows[5] = "q,a,extra"
    rows[8] = "q,"
    problems = problems_of(write("t.csv", "\n".join(rows)), name="t.csv")
    assert problems[0] == ("t.csv:6: the row has 3 fields but the header has 2 — quote fields that contain the "
                           "delimiter or line breaks")
    assert problems[1].startswith("t.csv:9: completion: is empty")
    problems = problems_of(write("t.csv", "question,answer\n" + "q,a\n" * 12), name="t.csv")
    assert problems == ["t.csv:1: the CSV header names no known columns (question, answer) — start the file with a "
                        "header row naming the columns: prompt,completion (or instruction,input,output)"]


def test_csv_with_semicolons_and_alpaca_columns(write):
    rows = ["\ufeffinstruction;input;output", ""] + [f"Double;{i};{2 * i}" for i in range(10)]
    examples = load_examples(write("t.csv", "\n".join(rows)))
    assert examples[0].line == 3
    assert examples[1].messages == [{"role": "user", "content": "Double\n\n1"}, {"role": "assistant", "content": "2"}]


def test_example_round_trips_as_a_record():
    ex = Example(3, chat_record(1)["messages"], tools=[{"type": "function", "function": {"name": "f"}}])
    assert ex.to_record() == {"messages": ex.messages, "tools": ex.tools}


def test_plain_messages_normalise_as_the_field_by_field_checks_do(write, monkeypatch):
    """The shortcut for {"role", "content"} messages gives what the full checks give, problems included."""
    from tunesmith.data.formats import openai_chat

    records = [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": ""},
                             {"role": "assistant", "content": "a"}]},
               {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
               {"messages": [{"role": ["user"], "content": "q"}, {"role": "assistant", "content": "a"}]},
               {"messages": [{"role": "function", "content": "q"}, {"role": "assistant", "content": "a"}]},
               {"messages": [{"role": "user", "content": "q"}, {"content": "a", "role": "assistant"}]}]
    path = write("t.jsonl", records * 3)

    def outcome():
        stream = ExampleStream(path)
        return [(e.line, json.dumps(e.messages)) for e in stream], stream.problems.listed()  # key order too

    fast = outcome()
    monkeypatch.setattr(openai_chat, "_plain", lambda raw: False)
    assert outcome() == fast
    assert len(fast[0]) == 6 and len(fast[1]) == 9
