"""The recipe end to end on the tiny model: each method, determinism, resume, masks, accumulation."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace

import pytest
import torch

from trainhelpers import quick_config
from tunesmith.errors import TunesmithError
from tunesmith.models.loading import load_causal_lm, load_tokenizer
from tunesmith.models.store import read_info
from tunesmith.train import batches
from tunesmith.train.metrics import COLUMNS, read_metrics
from tunesmith.train.recipe import evaluate, token_loss, train, train_step
from tunesmith.train.runs import read_manifest, resolve_run

# peft calls a helper that transformers 5 marks deprecated when loading adapters
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")

CPU = torch.device("cpu")


def load_trained(method: str, tiny_model_path, final):
    """The artefact of a finished run, loaded the way other tools load it."""
    if method == "full":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(final)
    from peft import PeftModel

    return PeftModel.from_pretrained(load_causal_lm(tiny_model_path, device=CPU), final)


def training_samples(config):
    return batches.build_data(config, load_tokenizer(config.model)).train


@pytest.mark.parametrize("method", ["lora", "dora", "full"])
def test_method_end_to_end(method, trained, tiny_model_path):
    config, result, events = trained(method)
    run_dir = result.run_dir
    assert result.status == "succeeded" and result.steps == 6 and result.trained_tokens > 0

    manifest = read_manifest(run_dir)
    assert manifest["status"] == "succeeded" and manifest["method"] == method
    assert manifest["resolved"]["n_epochs"] == 2 and manifest["resolved"]["total_steps"] == 6
    assert manifest["base_model"]["ref"] == str(tiny_model_path.resolve())
    rows = read_metrics(run_dir / "metrics.csv")
    header = (run_dir / "metrics.csv").read_text().splitlines()[0]
    assert header.split(",") == COLUMNS and [r["step"] for r in rows] == list(range(1, 7))
    assert rows[-1]["valid_loss"] is not None and rows[0]["valid_loss"] is None
    assert (run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert [p.name for p in resolve_run(str(run_dir)).checkpoints()] == ["step-3", "step-6"]  # one per epoch

    final = run_dir / "final"
    weights = ["adapter_config.json", "adapter_model.safetensors"] if method != "full" else [
        "config.json", "model.safetensors", "tunesmith_model.json"]
    for name in weights + ["tokenizer.json", "chat_template.jinja", "generation_config.json", "tunesmith_run.json"]:
        assert (final / name).is_file(), name
    tokenizer = load_tokenizer(final)
    generation = json.loads((final / "generation_config.json").read_text())
    assert generation["eos_token_id"] in (tokenizer.convert_tokens_to_ids("<|im_end|>"),
                                          [tokenizer.convert_tokens_to_ids("<|im_end|>")])

    kinds = [e.kind for e in events]
    assert kinds.count("metrics") == 6 and kinds.count("checkpoint") == 2
    assert any("resolved" in e.data for e in events if e.kind == "message")

    # The saved artefact, loaded as other tools load it, fits the training data better than the base.
    samples = training_samples(config)
    base = evaluate(load_causal_lm(tiny_model_path, device=CPU), samples, 4, CPU, _no_autocast)
    tuned = evaluate(load_trained(method, tiny_model_path, final), samples, 4, CPU, _no_autocast)
    assert tuned["loss"] < base["loss"] - 0.05, (base, tuned)


def _no_autocast():
    import contextlib

    return contextlib.nullcontext()


def test_same_seed_same_losses(trained, tmp_path):
    config, result, _ = trained("lora")
    again = train(replace(config, out=str(tmp_path / "again")))
    first, second = read_metrics(result.run_dir / "metrics.csv"), read_metrics(again.run_dir / "metrics.csv")
    for a, b in zip(first, second, strict=True):
        for column in ("train_loss", "train_accuracy", "valid_loss"):
            assert a[column] == pytest.approx(b[column], abs=1e-6, nan_ok=False) if a[column] is not None \
                else b[column] is None


def test_interrupted_then_resumed_matches_uninterrupted(trained, tmp_path, monkeypatch):
    config, result, _ = trained("lora")  # dropout 0.05: the RNG state must be restored too
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs" / "interrupted"
    stopped = train(replace(config, out=str(out)), should_stop=_stop_at(step=4))
    assert stopped.status == "interrupted" and stopped.steps == 4 and stopped.reason == "pause"
    assert read_manifest(out)["status"] == "interrupted" and not (out / "final").exists()
    with pytest.raises(TunesmithError, match="never finished"):
        resolve_run(str(out))  # an unfinished run is never mistaken for a model

    events: list = []  # no --out: the newest unfinished run of this model, data and method under ./runs
    resumed = train(replace(config, out=None), resume=True, on_event=events.append)
    assert resumed.run_dir == out
    assert resumed.status == "succeeded" and resumed.steps == 6
    assert any("resumed from checkpoints/step-4" in e.message for e in events)
    expected, got = read_metrics(result.run_dir / "metrics.csv"), read_metrics(out / "metrics.csv")
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for a, b in zip(expected, got):
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-5)
        if a["valid_loss"] is not None:
            assert b["valid_loss"] == pytest.approx(a["valid_loss"], abs=1e-5)
    assert resumed.trained_tokens == result.trained_tokens


def test_crashed_run_resumes_from_its_last_checkpoint(trained, tmp_path):
    config, result, _ = trained("lora")
    out = tmp_path / "crashed"

    def crash_at_step_5(calls={"n": 0}):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("the machine went away")

    with pytest.raises(RuntimeError):
        train(replace(config, out=str(out)), should_stop=crash_at_step_5)
    manifest = read_manifest(out)
    assert manifest["status"] == "failed" and "went away" in manifest["error"]
    assert len(read_metrics(out / "metrics.csv")) == 5  # steps 4 and 5 were never checkpointed

    resumed = train(replace(config, out=str(out)), resume=True)  # from step-3, the end of epoch 1
    expected, got = read_metrics(result.run_dir / "metrics.csv"), read_metrics(out / "metrics.csv")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(expected, got):
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-5)
    assert resumed.status == "succeeded"


def test_resume_keeps_the_runs_automatic_batch_size(tiny_model_path, tmp_path, monkeypatch):
    from trainhelpers import code_book_examples, write_jsonl

    from tunesmith.train import hyperparams

    data = write_jsonl(tmp_path / "64.jsonl", code_book_examples(64))
    config = quick_config(tiny_model_path, data, tmp_path / "run", epochs=1, batch_size="auto")
    first = train(config, should_stop=_stop_at(step=2))
    assert first.resolved["batch_size"] == 2  # 64 examples
    monkeypatch.setattr(hyperparams, "free_memory", lambda device: 1)  # now "auto" would pick 1
    events: list = []
    again = train(config, resume=True, on_event=events.append, should_stop=_stop_at(step=1))
    assert again.resolved["batch_size"] == 2 and again.steps == 3
    assert any("batch_size 2 kept from the run" in e.message for e in events)


def test_precision_auto_follows_the_hardware():
    from tunesmith.models.loading import cpu_has_fast_bf16
    from tunesmith.train.recipe import resolve_precision

    assert resolve_precision("auto", CPU) == ("bf16" if cpu_has_fast_bf16() else "fp32")
    assert resolve_precision("fp32", CPU) == "fp32" and resolve_precision("bf16", CPU) == "bf16"


def test_the_base_is_loaded_in_bf16_only_for_a_bf16_adapter_run_on_a_gpu():
    from tunesmith.train.methods import get_method

    cuda = torch.device("cuda")
    assert get_method("lora").load_dtype(cuda, "bf16") == torch.bfloat16
    assert get_method("lora").load_dtype(cuda, "fp32") == torch.float32  # fp32 asked: fp32 computed
    assert get_method("lora").load_dtype(CPU, "bf16") == torch.float32  # autocast casts, the copies are kept
    assert get_method("full").load_dtype(cuda, "bf16") == torch.float32  # master weights stay fp32


def test_bf16_run_learns_and_resumes_exactly(trained, tmp_path):
    config, fp32, _ = trained("lora")
    config = replace(config, precision="bf16", out=str(tmp_path / "bf16"))
    result = train(config)
    assert read_manifest(result.run_dir)["resolved"]["precision"] == "bf16"
    losses = [r["train_loss"] for r in read_metrics(result.run_dir / "metrics.csv")]
    fp32_losses = [r["train_loss"] for r in read_metrics(fp32.run_dir / "metrics.csv")]
    assert losses[-1] < losses[0]
    assert losses[-1] == pytest.approx(fp32_losses[-1], rel=0.05)  # bf16 matmuls, fp32 weights and loss

    out = tmp_path / "bf16-resumed"
    train(replace(config, out=str(out)), should_stop=_stop_at(step=4))
    train(replace(config, out=str(out)), resume=True)
    resumed = [r["train_loss"] for r in read_metrics(out / "metrics.csv")]
    assert resumed == pytest.approx(losses, abs=1e-5)
    # a resumed run loads its base for the precision it keeps, whatever is asked now
    from tunesmith.train.methods import get_method
    from tunesmith.train.recipe import _Session

    asked_fp32 = _Session(config=replace(config, precision="fp32", out=str(out)), method=get_method("lora"),
                          run_dir=out, emit=lambda event: None, should_stop=None)
    assert asked_fp32.run_precision(True, CPU) == "bf16" and asked_fp32.run_precision(False, CPU) == "fp32"


def _stop_at(step: int):
    calls = {"n": 0}

    def should_stop():
        calls["n"] += 1
        return "pause" if calls["n"] == step else None

    return should_stop


def test_resume_refuses_changed_settings(trained, tmp_path):
    config, _, _ = trained("lora")
    out = tmp_path / "run"
    train(replace(config, out=str(out), epochs=1), should_stop=_stop_at(step=1))
    with pytest.raises(TunesmithError) as caught:
        train(replace(config, out=str(out), epochs=3, seed=1), resume=True)
    assert "epochs" in str(caught.value) and "seed" in str(caught.value)


def test_sigint_writes_checkpoint_and_stops(tiny_model_path, data_dir, tmp_path):
    sent = {"done": False}

    def send_sigint_once():
        if not sent["done"]:
            sent["done"] = True
            os.kill(os.getpid(), signal.SIGINT)
        return None

    config = quick_config(tiny_model_path, data_dir / "train.jsonl", tmp_path / "run", epochs=3, batch_size=6)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs in a background job
    result = train(config, should_stop=send_sigint_once)
    assert result.status == "interrupted" and result.reason == "SIGINT"
    assert result.steps == 2  # the signal lands during step 1's check; step 2's check sees it
    assert (tmp_path / "run" / "checkpoints" / "step-2" / "training_state.pt").is_file()
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_loss_only_on_assistant_tokens(tiny_model_path, data_dir, tmp_path):
    config = quick_config(tiny_model_path, data_dir / "train.jsonl", tmp_path / "unused")
    tokenizer = load_tokenizer(tiny_model_path)
    samples = batches.build_data(config, tokenizer).train
    first = samples[0]
    trained_text = tokenizer.decode([t for t, label in zip(first.input_ids, first.labels) if label != -100])
    assert trained_text == "REBMA<|im_end|>"  # "amber" reversed, and the end of the turn; no system/user text

    model = load_causal_lm(tiny_model_path, device=CPU)
    batch = batches.collate(samples[:3], tokenizer.pad_token_id)
    with torch.no_grad():
        summed, _ = token_loss(model, batch)
        reference = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
    assert float(summed) / batch.labelled == pytest.approx(float(reference), rel=1e-5)


def test_drop_system_removes_the_system_prompt(tiny_model_path, data_dir, tmp_path):
    tokenizer = load_tokenizer(tiny_model_path)
    kept = batches.build_data(quick_config(tiny_model_path, data_dir / "train.jsonl", tmp_path), tokenizer)
    dropped = batches.build_data(quick_config(tiny_model_path, data_dir / "train.jsonl", tmp_path,
                                              drop_system=True), tokenizer)
    assert "code word" in tokenizer.decode(kept.train[0].input_ids)
    assert "code word" not in tokenizer.decode(dropped.train[0].input_ids)


def test_accumulation_equals_one_big_batch(tiny_model_path, data_dir, tmp_path):
    config = quick_config(tiny_model_path, data_dir / "train.jsonl", tmp_path, method="full")
    tokenizer = load_tokenizer(tiny_model_path)
    samples = batches.build_data(config, tokenizer).train[:4]
    gradients = []
    for group in ([batches.collate(samples, 2)], [batches.collate(samples[:2], 2), batches.collate(samples[2:], 2)]):
        model = load_causal_lm(tiny_model_path, device=CPU)
        parameters = list(model.parameters())
        optimizer = torch.optim.SGD(parameters, lr=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        stats = train_step(model, group, optimizer, scheduler, parameters, 1e9, CPU, _no_autocast)
        gradients.append((stats["loss"], model.lm_head.weight.grad.clone()))
    assert gradients[0][0] == pytest.approx(gradients[1][0], rel=1e-5)
    torch.testing.assert_close(gradients[0][1], gradients[1][1], rtol=1e-4, atol=1e-7)


def test_validation_split_and_accumulation_run(tiny_model_path, data_dir, tmp_path):
    config = quick_config(tiny_model_path, data_dir / "train.jsonl", tmp_path / "run", epochs=1, batch_size=2,
                          gradient_accumulation_steps=2, validation_split=0.25, method="full")
    result = train(config)
    assert result.resolved["n_train_examples"] == 9 and result.resolved["n_valid_examples"] == 3
    assert result.resolved["steps_per_epoch"] == 3 and result.steps == 3  # ceil(ceil(9/2)/2)
    assert result.metrics["valid_loss"] is not None


def test_model_without_chat_template_trains_with_its_turn_tokens(tiny_gemma_path, gemma3_path, data_dir, tmp_path):
    # drop_system keeps the examples short: this model's 262k-token output layer dominates the cost
    config = quick_config(tiny_gemma_path, data_dir / "train.jsonl", tmp_path / "run", epochs=1, batch_size=12,
                          drop_system=True)
    result = train(config)
    manifest = read_manifest(result.run_dir)
    assert manifest["drop_system"] is True
    assert manifest["chat_template_source"] == "tunesmith:gemma-turns" and manifest["end_of_turn"] == "<end_of_turn>"
    final = result.final_dir
    assert "<start_of_turn>" in (final / "chat_template.jinja").read_text()
    end_of_turn_id = read_info(gemma3_path).eos_token_ids[0]  # the id of <end_of_turn> (loading this tokenizer is slow)
    eos = json.loads((final / "generation_config.json").read_text())["eos_token_id"]
    assert (eos[0] if isinstance(eos, list) else eos) == end_of_turn_id
    assert json.loads((final / "tunesmith_run.json").read_text())["chat_template_source"] == "tunesmith:gemma-turns"
