"""`check_file`: errors, warnings and statistics; packing; the auto-epochs rule."""

from __future__ import annotations

import json
import shutil
import statistics

import pytest
from datafiles import chat_record, good_records

from tunesmith.data import (
    IGNORE_INDEX,
    EncodedExample,
    auto_epochs,
    check_file,
    encode_messages,
    load_examples,
    pack_examples,
)
from tunesmith.data.stats import LengthHistogram, estimate_training_seconds
from tunesmith.errors import NotFoundError, TunesmithError


def test_a_good_file_gets_exact_statistics(write, tiny_model_path, smollm2_tokenizer):
    records = [chat_record(i) for i in range(12)] + [chat_record(1000 + i) for i in range(3)]
    path = write("t.jsonl", records)
    report = check_file(path, model=str(tiny_model_path))
    assert report.ok and report.errors == [] and report.warnings == []
    assert (report.format, report.examples, report.template) == ("OpenAI chat", 15, "model")
    encoded = [encode_messages(smollm2_tokenizer, e.messages) for e in load_examples(path)]
    lengths = sorted(len(e.input_ids) for e in encoded)
    stats = report.stats
    assert (stats.tokens_min, stats.tokens_max) == (lengths[0], lengths[-1])
    assert stats.tokens_median == lengths[7]  # nearest rank of 15
    assert stats.total_tokens == sum(lengths)
    assert stats.trainable_tokens == sum(e.trainable_tokens for e in encoded)
    assert stats.max_length == 2048  # the tiny model's context
    assert stats.epochs == auto_epochs(15) == 7
    assert stats.billed_tokens == 7 * sum(lengths)
    assert stats.estimated_seconds["full"] > stats.estimated_seconds["lora"] > 0
    assert json.loads(json.dumps(report.to_dict()))["stats"]["examples"] == 15


def test_the_time_estimate_follows_the_method_and_the_precision_the_trainer_picks():
    fp32 = estimate_training_seconds(135_000_000, 1_000_000, 400e9, "cpu", "fp32")
    bf16 = estimate_training_seconds(135_000_000, 1_000_000, 400e9, "cpu", "bf16")
    # LoRA: 4 FLOPs per token and parameter at 45% of a 400 GFLOP/s matmul
    assert fp32["lora"] == pytest.approx(4 * 135e6 * 1e6 / (400e9 * 0.45), rel=1e-3)
    assert fp32["full"] > fp32["lora"] and bf16["lora"] < fp32["lora"] and bf16["full"] < fp32["full"]


def test_warnings_name_their_lines(write, tiny_model_path):
    records = good_records(12)
    records[4] = records[1]                                      # duplicate of line 2
    records[6] = chat_record(6, system="Another prompt.")        # inconsistent system prompt
    records[8]["messages"][2]["weight"] = 0                      # nothing to learn
    records[9] = chat_record(9)
    records[9]["messages"][1]["content"] = "x " * 300 + "<|im_end|>"  # long, and holds a turn token
    report = check_file(write("t.jsonl", records), model=str(tiny_model_path), max_length=100, name="t.jsonl")
    assert report.ok, report.errors
    assert "line 5 repeats line 2" in report.warnings[0]
    assert report.warnings[1].startswith("t.jsonl: 1 example longer than 100 tokens (--max-length), ")
    assert "(line 10: " in report.warnings[1] and report.stats.truncated_examples == 1
    cut = report.stats.truncated_tokens
    assert f"{cut:,} tokens will be cut" in report.warnings[1]
    assert report.warnings[2].startswith("t.jsonl: inconsistent system prompts: 2 different system prompts")
    assert "most common one is on 11 examples (first: line 1)" in report.warnings[2]
    assert report.warnings[3] == ("t.jsonl: 1 example with every assistant message at weight 0 (line 9) — they "
                                  "teach nothing: set weight 1 on the answers to learn")
    assert 'line 10: messages[1] contains "<|im_end|>"' in report.warnings[4]
    assert len(report.warnings) == 5


def test_errors_are_reported_not_raised(write, tiny_model_path):
    records = good_records(12)
    records[2] = {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}
    report = check_file(write("t.jsonl", records), model=str(tiny_model_path), name="t.jsonl")
    assert not report.ok and report.error_count == 1
    assert report.errors == ['t.jsonl:3: messages[1].role: unknown role "bot" — use system, user, assistant or tool']
    assert report.stats.examples == 11


def test_all_weight_zero_is_an_error(write, tiny_model_path):
    records = good_records(10)
    for record in records:
        record["messages"][2]["weight"] = 0
    report = check_file(write("t.jsonl", records), model=str(tiny_model_path), name="t.jsonl")
    assert report.errors[-1].startswith("t.jsonl: no example has an assistant message with weight 1")


def test_check_refuses_missing_file_and_unknown_model(tmp_path, write):
    with pytest.raises(NotFoundError, match="does not exist"):
        check_file(tmp_path / "nope.jsonl")
    with pytest.raises(NotFoundError, match="unknown model 'gpt-17'"):
        check_file(write("t.jsonl", good_records(10)), model="gpt-17")


def test_check_uses_the_gemma_template(write, tiny_gemma_path):
    report = check_file(write("t.jsonl", good_records(10)), model=str(tiny_gemma_path))
    assert report.ok and report.stats.max_length == 2048
    # "<bos><start_of_turn>system\n...": gemma-turns renders every example from one BOS
    assert report.stats.tokens_min > 10


def test_length_histogram_quantiles():
    hist = LengthHistogram()
    values = [5, 1, 9, 9, 3, 7, 100, 2, 8, 4]
    for v in values:
        hist.add(v)
    assert hist.quantile(0.5) == sorted(values)[4] == statistics.median_low(values)
    assert hist.quantile(0.95) == 100 and hist.quantile(0.0) == 1


@pytest.mark.parametrize("n,epochs", [(1, 10), (10, 10), (20, 5), (34, 3), (1000, 3), (8333, 3), (8334, 2),
                                      (12_500, 2), (12_501, 1), (1_000_000, 1)])
def test_auto_epochs(n, epochs):
    assert auto_epochs(n) == epochs


def _encoded(n: int, start: int) -> EncodedExample:
    ids = list(range(start, start + n))
    return EncodedExample(ids, [IGNORE_INDEX] * (n // 2) + ids[n // 2:])


def test_pack_examples_never_splits_and_restarts_positions():
    encoded = [_encoded(n, 100 * i) for i, n in enumerate([5, 4, 3, 8, 2, 6])]
    packed = pack_examples(encoded, max_length=10)
    assert [p.seq_lens for p in packed] == [[5, 4], [3], [8, 2], [6]]
    assert all(len(p.input_ids) == len(p.labels) == len(p.position_ids) <= 10 for p in packed)
    assert packed[0].position_ids == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert packed[0].input_ids == encoded[0].input_ids + encoded[1].input_ids
    assert packed[2].labels == encoded[3].labels + [IGNORE_INDEX] + encoded[4].labels[1:]
    assert sum(len(p) for p in packed) == sum(len(e.input_ids) for e in encoded)


def test_pack_examples_refuses_an_example_longer_than_the_budget():
    with pytest.raises(TunesmithError, match="more than the packing length 4"):
        pack_examples([_encoded(5, 0)], max_length=4)


def test_a_conversation_the_template_refuses_is_a_problem_at_its_line(write, tiny_model_path, tmp_path):
    folder = tmp_path / "no-tools-model"
    shutil.copytree(tiny_model_path, folder)
    # ChatML that, like some models' own templates, raises on a role it does not know
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool role') }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    records = good_records(12)
    records[3] = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [call]},
                               {"role": "tool", "tool_call_id": "c1", "content": "1"},
                               {"role": "assistant", "content": "one"}]}
    report = check_file(write("t.jsonl", records), model=str(folder), name="t.jsonl")
    assert report.errors == ["t.jsonl:4: messages: the chat template cannot render this conversation: no tool role — "
                             "the model's chat template decides which roles and turn orders it accepts (some require "
                             "user/assistant alternation): adapt the conversation or the model"]
    assert report.stats.examples == 11


def _varied_records() -> list[dict]:
    """40 examples of every shape the check counts: multi-turn, weight 0, tool calls, content parts,
    a duplicate far from its original, a long one, and invalid lines in between."""
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    records = []
    for i in range(40):
        record = chat_record(i, system="Answer briefly." if i % 7 else None)
        if i % 3 == 0:
            record["messages"] += [{"role": "user", "content": f"And {i} times two?"},
                                   {"role": "assistant", "content": f"{2 * i}.", "weight": i % 2}]
        if i % 5 == 0:
            record["messages"][-1]["content"] = [{"type": "text", "text": f"Parts {i}"}]
        if i % 11 == 0:
            record["messages"] = [{"role": "user", "content": "add"},
                                  {"role": "assistant", "tool_calls": [call]},
                                  {"role": "tool", "tool_call_id": "c1", "content": str(i)},
                                  {"role": "assistant", "content": f"It is {i}."}]
        records.append(record)
    records[5]["messages"][-1]["content"] = "Déjà vu 😀🙂, naïve café — 東京"  # several tokens per character
    records[33] = records[2]                                          # duplicate in a later batch
    records[20]["messages"][1]["content"] = "many words " * 60        # cut by max_length
    records[9] = {"messages": [{"role": "bot", "content": "x"}]}      # invalid lines between batches
    records[26] = {"prompt": "a format switch"}
    return records


def test_overlapped_batches_give_the_one_by_one_report(write, tiny_model_path, smollm2_tokenizer, monkeypatch):
    """The check tokenizes batch k while it reads batch k+1: the report equals one example at a time."""
    import tunesmith.data.check as check

    path = write("t.jsonl", _varied_records())
    reports = {}
    for batch in (7, 1, 10_000):  # several batches in flight, one example per batch, all in one batch
        monkeypatch.setattr(check, "BATCH", batch)
        reports[batch] = check_file(path, model=str(tiny_model_path), max_length=64, name="t.jsonl").to_dict()
    assert reports[7] == reports[1] == reports[10_000]
    report = reports[7]
    assert report["error_count"] == 2 and report["errors"][0].startswith("t.jsonl:10: messages[0].role")
    assert "line 34 repeats line 3" in report["warnings"][0]
    stream = check.ExampleStream(path)
    encoded = [encode_messages(smollm2_tokenizer, e.messages, tools=e.tools, max_length=64) for e in stream]
    full = [len(e.input_ids) + e.truncated_tokens for e in encoded]
    stats = report["stats"]
    assert stats["examples"] == len(encoded) == 38
    assert (stats["tokens_min"], stats["tokens_max"]) == (min(full), max(full))
    assert stats["total_tokens"] == sum(len(e.input_ids) for e in encoded)
    assert stats["trainable_tokens"] == sum(e.trainable_tokens for e in encoded) == _labelled_by_definition(
        smollm2_tokenizer, check.ExampleStream(path), 64)
    cut = [e.truncated_tokens for e in encoded if e.truncated_tokens]
    assert (stats["truncated_examples"], stats["truncated_tokens"]) == (len(cut), sum(cut))
    assert encoded[19].truncated_tokens in cut


def _labelled_by_definition(tokenizer, examples, max_length: int) -> int:
    """Tokens (of the first ``max_length``) whose first character lies in a loss span, token by token."""
    from tunesmith.data.chat import renderer_for

    renderer = renderer_for(tokenizer)
    total = 0
    for example in examples:
        text, spans = renderer.render_with_spans(example.messages, example.tools)
        offsets = renderer.tokenize([text])[0].offsets[:max_length]
        total += sum(1 for start, _ in offsets if any(begin <= start < end for begin, end in spans))
    return total
