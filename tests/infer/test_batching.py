"""Continuous batching on the tiny random model: every row of a mixed batch answers as ``generate`` alone does.

Real threads call the engine; the scheduler is held while they queue so that they
really share a batch (checked with ``peak_rows``), then released.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from tunesmith.infer import Engine, GenerationSettings
from tunesmith.models.loading import load_causal_lm

PROMPTS = [[{"role": "user", "content": "Hi"}],
           [{"role": "user", "content": "Route this ticket: my card was charged twice, please refund one."}],
           [{"role": "system", "content": "You route support tickets to a team."},
            {"role": "user", "content": "The VPN drops every evening at six and I lose my work."}],
           [{"role": "user", "content": "ticket 7"}]]


@pytest.fixture(scope="module")
def engine():
    made = Engine(device="cpu")
    yield made
    made.close()


@pytest.fixture(scope="module")
def reference(tiny_model_path):
    """``reference(adapter_folder_or_None, prompt_ids, n, eos_ids)``: plain ``generate`` on one prompt, greedy."""
    from peft import PeftModel

    models: dict = {}

    def generate(adapter: Path | None, prompt: list[int], n: int, eos_ids: list[int]) -> list[int]:
        if adapter not in models:
            model = load_causal_lm(tiny_model_path, device=torch.device("cpu"), dtype=torch.float32)
            models[adapter] = (PeftModel.from_pretrained(model, str(adapter)) if adapter else model).eval()
        ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = models[adapter].generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                           do_sample=False, eos_token_id=eos_ids, pad_token_id=eos_ids[0])
        return out[0, len(prompt):].tolist()

    return generate


def _wait(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def run_together(engine: Engine, jobs: list, mid_step: bool = False) -> list:
    """Run ``jobs`` (each ``(model_ref, callable)``) in threads that all join one batch; returns their results.

    ``mid_step``: hold the model too, so that rows already running are mid-answer when the jobs join.
    """
    handles = [engine.resolve(ref) for ref, _ in jobs]
    schedulers = list({id(s): s for s in (engine._scheduler(h) for h in handles)}.values())
    results: list = [None] * len(jobs)
    model_lock = engine._bases[handles[0].base_key].lock
    if mid_step:
        model_lock.acquire()

    def work(i: int) -> None:
        results[i] = jobs[i][1]()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    holds = [s.held() for s in schedulers]
    for hold in holds:
        hold.__enter__()
    try:
        for thread in threads:
            thread.start()
        _wait(lambda: sum(s.queued for s in schedulers) == len(jobs))
        for scheduler in schedulers:
            scheduler.peak_rows = 0
    finally:
        for hold in holds:
            hold.__exit__(None, None, None)
        if mid_step:
            model_lock.release()
    for thread in threads:
        thread.join(timeout=120)
    return results


def test_concurrent_prompts_of_different_lengths_match_generate(engine, tiny_model_path, reference):
    handle = engine.resolve(str(tiny_model_path))
    settings = GenerationSettings(max_tokens=10)
    done = run_together(engine, [(str(tiny_model_path), lambda p=p: engine.chat(handle, p, settings))
                                 for p in PROMPTS])
    assert engine._scheduler(handle).peak_rows == len(PROMPTS)
    for messages, completion in zip(PROMPTS, done):
        prompt = engine.prompt_ids(handle, messages)
        assert completion.token_ids == reference(None, prompt, 10, handle.eos_ids)
        assert completion.prompt_tokens == len(prompt)
        assert completion.completion_tokens == 10 and completion.finish_reason == "length"


def test_requests_joining_mid_batch_match_generate(engine, tiny_model_path, reference):
    handle = engine.resolve(str(tiny_model_path))
    scheduler = engine._scheduler(handle)
    long = engine.chat_stream(handle, PROMPTS[2], GenerationSettings(max_tokens=24))
    first = next(iter(long))
    late = run_together(engine, [(str(tiny_model_path), lambda p=p, n=n: engine.chat(handle, p, GenerationSettings(
        max_tokens=n))) for p, n in ((PROMPTS[0], 6), (PROMPTS[1], 12))], mid_step=True)
    joined = scheduler.peak_rows
    text = first + "".join(long)
    assert long.completion.text == text
    assert long.completion.token_ids == reference(None, engine.prompt_ids(handle, PROMPTS[2]), 24, handle.eos_ids)
    for (messages, n), completion in zip(((PROMPTS[0], 6), (PROMPTS[1], 12)), late):
        assert completion.token_ids == reference(None, engine.prompt_ids(handle, messages), n, handle.eos_ids)
    assert joined == 3  # the late requests joined the running one
    _wait(lambda: scheduler.active_rows == 0)


def test_two_adapters_and_the_base_in_one_batch_match_peft(engine, tiny_model_path, tiny_adapters, reference,
                                                          monkeypatch):
    refs = [str(tiny_model_path), str(tiny_adapters["a"]), str(tiny_adapters["b"]), str(tiny_adapters["a"])]
    handles = [engine.resolve(ref) for ref in refs]
    settings = GenerationSettings(max_tokens=8)
    assert len({id(engine._scheduler(h)) for h in handles}) == 1  # one batch for the base and both adapters
    lora = engine._bases[handles[0].base_key].lora
    batches = []  # the rows' adapters of every forward pass
    monkeypatch.setattr(lora, "rows", lambda adapters, device, rows=lora.rows: batches.append(adapters)
                        or rows(adapters, device))
    done = run_together(engine, [(ref, lambda h=h, p=p: engine.chat(h, p, settings))
                                 for ref, h, p in zip(refs, handles, PROMPTS)])
    # the rows joined as base, a, b, a and decode side by side by adapter, in slot order, the base last
    steps = [adapters for adapters in batches if len(adapters) == len(refs)]
    assert steps and all(adapters == steps[0] for adapters in steps)
    assert steps[0] == sorted([h.adapter_name for h in handles], key=lora.row_order)
    assert steps[0][-1] is None and steps[0][0] == steps[0][1] == handles[1].adapter_name
    answers = []
    for ref, handle, messages, completion in zip(refs, handles, PROMPTS, done):
        adapter = None if ref == str(tiny_model_path) else Path(ref)
        expected = reference(adapter, engine.prompt_ids(handle, messages), 8, handle.eos_ids)
        assert completion.token_ids == expected, ref
        answers.append(expected)
    # the adapters really change the answers (else this test would prove nothing)
    base = engine.prompt_ids(handles[0], PROMPTS[1])
    assert reference(tiny_adapters["a"], base, 8, handles[0].eos_ids) != reference(None, base, 8, handles[0].eos_ids)


@pytest.mark.parametrize("rows", [("b", "b"), (None, "b", None)], ids=["one-adapter", "one-adapter-and-base"])
def test_rows_of_one_adapter_among_several_match_peft(engine, tiny_model_path, tiny_adapters, reference, rows):
    # with both adapters stacked, a decode step of one adapter reads only that adapter's slot
    handles = {key: engine.resolve(str(tiny_adapters[key])) for key in ("a", "b")}
    handles[None] = engine.resolve(str(tiny_model_path))
    assert len(engine._bases[handles[None].base_key].lora.slots) >= 2
    settings = GenerationSettings(max_tokens=8)
    refs = [str(tiny_model_path) if key is None else str(tiny_adapters[key]) for key in rows]
    done = run_together(engine, [(ref, lambda h=handles[key], p=p: engine.chat(h, p, settings))
                                 for ref, key, p in zip(refs, rows, PROMPTS)])
    for key, messages, completion in zip(rows, PROMPTS, done):
        adapter = None if key is None else tiny_adapters[key]
        prompt = engine.prompt_ids(handles[key], messages)
        assert completion.token_ids == reference(adapter, prompt, 8, handles[key].eos_ids), key


def test_dora_adapter_runs_through_peft_beside_the_batch(engine, tiny_model_path, tiny_adapters, reference):
    dora, plain = engine.resolve(str(tiny_adapters["dora"])), engine.resolve(str(tiny_adapters["a"]))
    assert engine._scheduler(dora) is not engine._scheduler(plain)  # peft runs DoRA itself, in its own batch
    settings = GenerationSettings(max_tokens=8)
    done = run_together(engine, [(str(tiny_adapters["dora"]), lambda: engine.chat(dora, PROMPTS[1], settings)),
                                 (str(tiny_adapters["dora"]), lambda: engine.chat(dora, PROMPTS[2], settings)),
                                 (str(tiny_adapters["a"]), lambda: engine.chat(plain, PROMPTS[1], settings))])
    for completion, handle, messages, folder in zip(done, (dora, dora, plain), (PROMPTS[1], PROMPTS[2], PROMPTS[1]),
                                                    (tiny_adapters["dora"], tiny_adapters["dora"], tiny_adapters["a"])):
        assert completion.token_ids == reference(folder, engine.prompt_ids(handle, messages), 8, handle.eos_ids)
    assert engine._scheduler(dora).peak_rows == 2


def test_stop_strings_and_max_tokens_per_row(engine, tiny_model_path, reference):
    handle = engine.resolve(str(tiny_model_path))
    decode = handle.tokenizer.decode
    full = reference(None, engine.prompt_ids(handle, PROMPTS[1]), 24, handle.eos_ids)
    full_text = decode(full, skip_special_tokens=True)
    assert len(full_text) > 8
    stop = full_text[4:7]
    jobs = [(str(tiny_model_path), lambda: engine.chat(handle, PROMPTS[1], GenerationSettings(max_tokens=24,
                                                                                               stop=[stop]))),
            (str(tiny_model_path), lambda: engine.chat(handle, PROMPTS[0], GenerationSettings(max_tokens=3))),
            (str(tiny_model_path), lambda: engine.chat(handle, PROMPTS[3], GenerationSettings(max_tokens=14)))]
    stopped, short, longer = run_together(engine, jobs)
    assert stopped.text == full_text[: full_text.find(stop)]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == full[: len(stopped.token_ids)] and len(stopped.token_ids) < 24
    assert short.token_ids == reference(None, engine.prompt_ids(handle, PROMPTS[0]), 3, handle.eos_ids)
    assert short.completion_tokens == 3 and short.finish_reason == "length"
    assert longer.token_ids == reference(None, engine.prompt_ids(handle, PROMPTS[3]), 14, handle.eos_ids)


def test_cancelling_one_stream_leaves_the_others_intact(engine, tiny_model_path, reference):
    handle = engine.resolve(str(tiny_model_path))
    scheduler = engine._scheduler(handle)
    settings = GenerationSettings(max_tokens=16)
    streams = [engine.chat_stream(handle, p, settings) for p in PROMPTS[:3]]
    firsts = run_together(engine, [(str(tiny_model_path), lambda s=s: next(iter(s))) for s in streams])
    assert scheduler.peak_rows == 3
    streams[1].close()  # the client of the second one went away
    texts = [firsts[i] + "".join(streams[i]) for i in (0, 2)]
    for i, text in zip((0, 2), texts):
        assert streams[i].completion.text == text
        assert streams[i].completion.token_ids == reference(None, engine.prompt_ids(handle, PROMPTS[i]), 16,
                                                            handle.eos_ids)
    _wait(lambda: scheduler.active_rows == 0)


def test_seeded_sampling_is_per_row(engine, tiny_model_path):
    handle = engine.resolve(str(tiny_model_path))
    sampled = [GenerationSettings(max_tokens=10, temperature=1.0, seed=s, top_p=0.9) for s in (1, 2)]
    alone = [engine.chat(handle, PROMPTS[1], s).token_ids for s in sampled]
    greedy = engine.chat(handle, PROMPTS[2], GenerationSettings(max_tokens=10)).token_ids
    together = run_together(engine, [(str(tiny_model_path), lambda s=s: engine.chat(handle, PROMPTS[1], s))
                                     for s in sampled]
                            + [(str(tiny_model_path), lambda: engine.chat(handle, PROMPTS[2],
                                                                           GenerationSettings(max_tokens=10)))])
    assert [c.token_ids for c in together] == alone + [greedy]
    assert alone[0] != alone[1]  # different seeds, different samples


def test_ignore_eos_generates_up_to_max_tokens(engine, tiny_model_path):
    from dataclasses import replace

    handle = engine.resolve(str(tiny_model_path))
    free = engine.chat(handle, PROMPTS[1], GenerationSettings(max_tokens=6, ignore_eos=True))
    assert free.completion_tokens == 6
    end = free.token_ids[1]  # pretend its second token ends the turn
    ends_early = replace(handle, eos_ids=[end])
    stopped = engine.chat(ends_early, PROMPTS[1], GenerationSettings(max_tokens=6))
    assert stopped.token_ids == free.token_ids[:free.token_ids.index(end) + 1] and stopped.finish_reason == "stop"
    ignored = engine.chat(ends_early, PROMPTS[1], GenerationSettings(max_tokens=6, ignore_eos=True))
    assert ignored.token_ids == free.token_ids and ignored.finish_reason == "length"
