"""The generation engine on the tiny random model: greedy == generate, stops, streaming, adapters."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from tunesmith.errors import ConfigError, NotFoundError
from tunesmith.infer import Engine, GenerationSettings
from tunesmith.models.loading import load_causal_lm, load_tokenizer

MESSAGES = [{"role": "user", "content": "Route this ticket: my card was charged twice."}]


@pytest.fixture(scope="module")
def engine():
    return Engine(device="cpu")


def _reference_generate(model_path: Path, prompt_ids: list[int], max_new_tokens: int, eos_ids) -> list[int]:
    model = load_causal_lm(model_path, device=torch.device("cpu"), dtype=torch.float32)
    ids = torch.tensor([prompt_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=eos_ids, pad_token_id=eos_ids[0])
    return out[0, len(prompt_ids):].tolist()


def test_greedy_equals_model_generate(engine, tiny_model_path):
    settings = GenerationSettings(max_tokens=12, temperature=0)
    done = engine.chat(str(tiny_model_path), MESSAGES, settings)
    handle = engine.resolve(str(tiny_model_path))
    prompt = engine.prompt_ids(handle, MESSAGES)
    assert done.token_ids == _reference_generate(tiny_model_path, prompt, 12, handle.eos_ids)
    assert done.prompt_tokens == len(prompt)
    assert done.completion_tokens == len(done.token_ids) == 12
    assert done.finish_reason == "length"
    assert settings.temperature == 0  # kept as given


def test_prompt_is_the_training_rendering(engine, tiny_model_path):
    tokenizer = load_tokenizer(tiny_model_path)
    ids = engine.prompt_ids(str(tiny_model_path), MESSAGES)
    text = tokenizer.decode(ids)
    assert text.endswith("<|im_start|>assistant\n")
    assert "my card was charged twice." in text


def test_stops_at_end_of_turn_from_generation_config(engine, tiny_model_path, tmp_path):
    first = engine.chat(str(tiny_model_path), MESSAGES, GenerationSettings(max_tokens=12)).token_ids
    # A copy whose generation config says that a token the model greedily writes ends the turn
    # (the last one written for the first time, so the answer before it is as long as can be).
    k = max(i for i, token in enumerate(first) if token not in first[:i])
    folder = tmp_path / "eot-model"
    shutil.copytree(tiny_model_path, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    config["eos_token_id"] = first[k]
    (folder / "generation_config.json").write_text(json.dumps(config))
    done = engine.chat(str(folder), MESSAGES, GenerationSettings(max_tokens=12))
    assert done.token_ids == first[: k + 1]
    assert done.finish_reason == "stop"
    assert done.completion_tokens == k + 1
    tokenizer = load_tokenizer(folder)
    assert done.text == tokenizer.decode(first[:k], skip_special_tokens=True)


def test_stop_strings_cut_the_answer_and_the_stream(engine, tiny_model_path):
    full = engine.chat(str(tiny_model_path), MESSAGES, GenerationSettings(max_tokens=24))
    assert len(full.text) > 6
    stop = full.text[3:6]
    cut = full.text[: full.text.find(stop)]
    done = engine.chat(str(tiny_model_path), MESSAGES, GenerationSettings(max_tokens=24, stop=[stop]))
    assert done.text == cut
    assert done.finish_reason == "stop"
    stream = engine.chat_stream(str(tiny_model_path), MESSAGES, GenerationSettings(max_tokens=24, stop=[stop]))
    deltas = list(stream)
    assert "".join(deltas) == cut
    assert stream.completion.text == cut


def test_stream_deltas_join_to_the_completion(engine, tiny_model_path):
    settings = GenerationSettings(max_tokens=16)
    stream = engine.chat_stream(str(tiny_model_path), MESSAGES, settings)
    text = "".join(stream)
    assert text == stream.completion.text == engine.chat(str(tiny_model_path), MESSAGES, settings).text
    assert stream.completion.completion_tokens == 16


def test_legacy_completion_continues_raw_text(engine, tiny_model_path):
    done = engine.complete(str(tiny_model_path), "Once upon a time", GenerationSettings(max_tokens=5))
    tokenizer = load_tokenizer(tiny_model_path)
    assert done.prompt_tokens == len(tokenizer("Once upon a time")["input_ids"])
    assert done.completion_tokens == 5


def test_sampling_with_a_seed_is_reproducible(engine, tiny_model_path):
    settings = GenerationSettings(max_tokens=10, temperature=1.0, seed=3)
    first = engine.chat(str(tiny_model_path), MESSAGES, settings).token_ids
    assert engine.chat(str(tiny_model_path), MESSAGES, settings).token_ids == first


def test_concurrent_requests_give_the_sequential_answers(engine, tiny_model_path):
    prompts = [[{"role": "user", "content": f"ticket number {i}"}] for i in range(4)]
    settings = GenerationSettings(max_tokens=8)
    expected = [engine.chat(str(tiny_model_path), p, settings).token_ids for p in prompts]
    got = [None] * len(prompts)

    def ask(i):
        got[i] = engine.chat(str(tiny_model_path), prompts[i], settings).token_ids

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected


def test_adapters_attach_to_one_base_and_swap(tiny_model_path, tiny_adapters):
    from peft import PeftModel

    first, second = tiny_adapters["a"], tiny_adapters["b"]
    engine = Engine(device="cpu")
    settings = GenerationSettings(max_tokens=10)
    base_before = engine.chat(str(tiny_model_path), MESSAGES, settings).token_ids
    a = engine.chat(str(first), MESSAGES, settings).token_ids
    b = engine.chat(str(second), MESSAGES, settings).token_ids
    assert len(engine._bases) == 1  # one copy of the base, two adapters on it
    assert a != base_before and b != base_before and a != b
    # swapping back and forth gives the same answers; the base is untouched by the adapters
    assert engine.chat(str(tiny_model_path), MESSAGES, settings).token_ids == base_before
    assert engine.chat(str(first), MESSAGES, settings).token_ids == a
    assert engine.chat(str(second), MESSAGES, settings).token_ids == b
    # and the adapter's answer is what peft gives when loading it on its own
    model = PeftModel.from_pretrained(load_causal_lm(tiny_model_path, device=torch.device("cpu"),
                                                     dtype=torch.float32), str(first))
    handle = engine.resolve(str(first))
    prompt = torch.tensor([engine.prompt_ids(handle, MESSAGES)])
    ref = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10,
                         do_sample=False, eos_token_id=handle.eos_ids, pad_token_id=handle.eos_ids[0])
    assert ref[0, prompt.shape[1]:].tolist() == a


def test_bad_references_and_settings(engine, tmp_path):
    with pytest.raises(NotFoundError):
        engine.resolve(str(tmp_path / "missing"))
    with pytest.raises(NotFoundError, match="holds no model"):
        engine.resolve(str(tmp_path))
    with pytest.raises(NotFoundError, match="unknown model"):
        engine.resolve("no-such-model")
    with pytest.raises(ConfigError) as info:
        GenerationSettings(max_tokens=0, temperature=-1, top_p=0)
    assert len(info.value.problems) == 3
