"""Chat rendering and loss masks, decoded and compared with the assistant texts, for both templates."""

from __future__ import annotations

import json

import pytest

from tunesmith.data import (
    IGNORE_INDEX,
    drop_system,
    encode_examples,
    encode_messages,
    encode_prompt,
    load_examples,
    parse_tool_calls,
    render_prompt,
)
from tunesmith.data.chat import renderer_for
from tunesmith.data.messages import assistant_text, template_messages
from tunesmith.errors import TunesmithError
from tunesmith.models.loading import load_tokenizer

END_OF_TURN = {"smollm2": "<|im_end|>", "gemma": "<end_of_turn>"}


@pytest.fixture(scope="module", params=["smollm2", "gemma"])
def tok(request):
    """(name, tokenizer) for the tiny SmolLM2 (ChatML, own template) and tiny Gemma 3 (gemma-turns)."""
    return request.param, request.getfixturevalue(f"{request.param}_tokenizer")


def labelled_runs(tokenizer, encoded) -> list[str]:
    """The labelled tokens, decoded one contiguous run at a time."""
    runs, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels):
        if label != IGNORE_INDEX:
            assert label == token, "a label is the token itself"
            current.append(label)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]


def expected_runs(messages, end_of_turn) -> list[str]:
    return [assistant_text(m) + end_of_turn for m in messages
            if m["role"] == "assistant" and m.get("weight", 1) == 1]


CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]

RECORDS = {
    "openai-chat": {"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi there!"},
        {"role": "assistant", "content": "Hello. ☀️ Ça va?", "weight": 0},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"sky": "clear"}'},
        {"role": "assistant", "content": " Clear skies,\n  22 °C.\n"},
    ], "tools": TOOLS},
    "prompt-completion": {"prompt": "Translate: chat\n\n###\n\n", "completion": " cat END"},
    "alpaca": {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
    "sharegpt": {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Name?"},
                                   {"from": "gpt", "value": "Ada."}, {"from": "human", "value": "Age?"},
                                   {"from": "gpt", "value": "36"}]},
    "no-system": {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
}


@pytest.mark.parametrize("kind", list(RECORDS))
def test_masked_tokens_are_exactly_the_assistant_texts(tok, write, kind):
    name, tokenizer = tok
    example = load_examples(write("t.jsonl", [RECORDS[kind]] * 10))[0]
    encoded = encode_messages(tokenizer, example.messages, tools=example.tools)
    assert labelled_runs(tokenizer, encoded) == expected_runs(example.messages, END_OF_TURN[name])
    # the rendered turn header is never trained on
    header = "<|im_start|>assistant\n" if name == "smollm2" else "<start_of_turn>model\n"
    assert not any(header in run for run in labelled_runs(tokenizer, encoded))
    # the same ids the tokenizer's own call gives for the rendered text
    text = renderer_for(tokenizer).render_with_spans(example.messages, example.tools)[0]
    assert encoded.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert encoded.truncated_tokens == 0


def test_smollm2_default_system_prompt_stays_unlabelled(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    messages = RECORDS["no-system"]["messages"]
    encoded = encode_messages(tokenizer, messages)
    text = tokenizer.decode(encoded.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert labelled_runs(tokenizer, encoded) == ["4<|im_end|>"]


def test_gemma_text_begins_with_one_bos(gemma_tokenizer):
    tokenizer = gemma_tokenizer
    encoded = encode_messages(tokenizer, RECORDS["no-system"]["messages"])
    assert encoded.input_ids[0] == tokenizer.bos_token_id
    assert encoded.input_ids.count(tokenizer.bos_token_id) == 1


def test_render_prompt_is_the_prefix_of_training_text(tok):
    name, tokenizer = tok
    messages = RECORDS["openai-chat"]["messages"]
    ids = encode_messages(tokenizer, messages, tools=TOOLS).input_ids
    text = renderer_for(tokenizer).render_with_spans(messages, TOOLS)[0]
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render_prompt(tokenizer, messages[:i], tools=TOOLS)
        assert text.startswith(prompt + assistant_text(message) + END_OF_TURN[name])
        prompt_ids = encode_prompt(tokenizer, messages[:i], tools=TOOLS)
        assert ids[: len(prompt_ids)] == prompt_ids


def test_render_prompt_refuses_a_final_assistant_message(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    with pytest.raises(TunesmithError, match="ends with an assistant message"):
        render_prompt(tokenizer, RECORDS["no-system"]["messages"])


def test_tools_go_into_the_system_prompt_and_calls_render_as_blocks():
    shown = template_messages(RECORDS["openai-chat"]["messages"], TOOLS)
    assert shown[0]["role"] == "system" and shown[0]["content"].startswith("You are terse.\n\n")
    assert json.dumps(TOOLS[0]["function"]) in shown[0]["content"]
    assert shown[4]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    without_system = template_messages(drop_system(RECORDS["openai-chat"]["messages"]), TOOLS)
    assert without_system[0]["role"] == "system" and without_system[0]["content"].startswith("You can call")
    assert [m["role"] for m in without_system[1:]] == ["user", "assistant", "user", "assistant", "tool", "assistant"]


def test_parse_tool_calls_inverts_the_rendering():
    text = assistant_text({"role": "assistant", "content": "Checking.", "tool_calls": [CALL, CALL]})
    content, calls = parse_tool_calls(text)
    assert content == "Checking."
    assert [c["function"] for c in calls] == [CALL["function"], CALL["function"]]
    assert parse_tool_calls("<tool_call>\nnot json\n</tool_call>") == ("<tool_call>\nnot json\n</tool_call>", [])


def test_truncation_counts_cut_tokens(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    full = encode_messages(tokenizer, RECORDS["openai-chat"]["messages"], tools=TOOLS)
    cut = encode_messages(tokenizer, RECORDS["openai-chat"]["messages"], tools=TOOLS, max_length=50)
    assert len(cut.input_ids) == len(cut.labels) == 50
    assert cut.truncated_tokens == len(full.input_ids) - 50
    assert cut.input_ids == full.input_ids[:50]


def test_encode_examples_matches_encode_messages(smollm2_tokenizer, write):
    tokenizer = smollm2_tokenizer
    examples = load_examples(write("t.jsonl", [RECORDS["openai-chat"], RECORDS["no-system"]] * 5))
    batched = list(encode_examples(tokenizer, examples, batch_size=3, without_system=True))
    for example, encoded in zip(examples, batched):
        single = encode_messages(tokenizer, drop_system(example.messages), tools=example.tools)
        assert (encoded.input_ids, encoded.labels) == (single.input_ids, single.labels)
    assert "You are terse" not in tokenizer.decode(batched[0].input_ids)


def test_a_template_that_is_not_prefix_stable_is_refused(tiny_model_path):
    tokenizer = load_tokenizer(tiny_model_path)  # a fresh one: its template is replaced
    # merges the system prompt into the first user turn only when an assistant turn follows
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and loop.last %}<a>{{ m['content'] }}<|im_end|>"
        "{% else %}<{{ m['role'] }}>{{ m['content'] }}|{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<a>{% endif %}"
    )
    with pytest.raises(TunesmithError, match="cannot be masked turn by turn"):
        encode_messages(tokenizer, RECORDS["no-system"]["messages"])
