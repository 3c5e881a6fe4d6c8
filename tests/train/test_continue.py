"""Continue fine-tuning: --model accepts a finished run.

A continued run trained with a vanishing learning rate must end where its parent
ended: that proves it started from the parent's weights (a fresh adapter starts
at zero, a fresh full run at the base).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from trainhelpers import quick_config

from tunesmith.errors import TunesmithError
from tunesmith.train.recipe import train
from tunesmith.train.runs import read_manifest

# peft calls a helper that transformers 5 marks deprecated when loading adapters
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")

FROZEN = 1e-9  # learning_rate_multiplier that leaves the weights where they start


def _weights(folder, name):
    return load_file(str(folder / name))


def test_lora_on_lora_continues_the_same_adapter(trained, data_dir, tmp_path, tiny_model_path):
    _, parent, _ = trained("lora")
    config = quick_config(str(parent.run_dir), data_dir / "more.jsonl", tmp_path / "child", epochs=1,
                          learning_rate_multiplier=FROZEN)
    child = train(config)
    manifest = read_manifest(child.run_dir)
    assert manifest["parent_run"]["path"] == str(parent.run_dir)
    assert manifest["base_model"]["ref"] == str(tiny_model_path.resolve())  # still an adapter on the same base
    assert child.resolved["lora_r"] == 16 and child.resolved["trainable_parameters"] == parent.resolved[
        "trainable_parameters"]
    before = _weights(parent.final_dir, "adapter_model.safetensors")
    after = _weights(child.final_dir, "adapter_model.safetensors")
    assert before.keys() == after.keys()
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=1e-6)
    assert any(v.abs().sum() > 0 for k, v in after.items() if "lora_B" in k)  # not a fresh (zero) adapter


def test_continued_lora_learns_the_new_data(trained, data_dir, tmp_path):
    _, parent, _ = trained("lora")
    child = train(quick_config(str(parent.run_dir), data_dir / "more.jsonl", tmp_path / "child", epochs=1))
    before = _weights(parent.final_dir, "adapter_model.safetensors")
    after = _weights(child.final_dir, "adapter_model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_full_on_full_continues_the_weights(trained, data_dir, tmp_path):
    _, parent, _ = trained("full")
    child = train(quick_config(str(parent.run_dir), data_dir / "more.jsonl", tmp_path / "child", method="full",
                               epochs=1, learning_rate_multiplier=FROZEN))
    before, after = _weights(parent.final_dir, "model.safetensors"), _weights(child.final_dir, "model.safetensors")
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=0, atol=1e-6)
    assert read_manifest(child.run_dir)["base_model"]["ref"] == str(parent.final_dir)


def test_full_on_lora_merges_the_adapter_first(trained, data_dir, tmp_path):
    from peft import PeftModel

    from tunesmith.models.loading import load_causal_lm

    config, parent, _ = trained("lora")
    child = train(quick_config(str(parent.run_dir), data_dir / "more.jsonl", tmp_path / "child", method="full",
                               epochs=1, learning_rate_multiplier=FROZEN))
    merged = PeftModel.from_pretrained(load_causal_lm(config.model, device=torch.device("cpu")),
                                       parent.final_dir).merge_and_unload()
    after = _weights(child.final_dir, "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(after[key], merged.state_dict()[key], rtol=0, atol=1e-6)


def test_lora_on_full_puts_an_adapter_on_the_full_run(trained, data_dir, tmp_path):
    _, parent, _ = trained("full")
    child = train(quick_config(str(parent.run_dir), data_dir / "more.jsonl", tmp_path / "child", epochs=1))
    assert read_manifest(child.run_dir)["base_model"]["ref"] == str(parent.final_dir)
    adapter = json.loads((child.final_dir / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA"


def test_other_adapter_kind_is_refused_with_a_way_out(trained, data_dir, tmp_path):
    _, parent, _ = trained("dora")
    with pytest.raises(TunesmithError) as caught:
        train(quick_config(str(parent.run_dir), data_dir / "more.jsonl", tmp_path / "child", method="lora"))
    assert "dora adapter" in caught.value.message and "--merged" in caught.value.hint
    assert not (tmp_path / "child").exists()


def test_conflicting_adapter_settings_are_refused(trained, data_dir, tmp_path):
    _, parent, _ = trained("lora")
    with pytest.raises(TunesmithError, match="lora_r"):
        train(quick_config(str(parent.run_dir), data_dir / "more.jsonl", tmp_path / "child", lora_r=8))


def test_continuing_replays_the_earlier_training_data(trained, data_dir, tmp_path):
    _, parent, _ = trained("lora")
    events: list = []
    child = train(quick_config(str(parent.run_dir), data_dir / "more.jsonl", tmp_path / "child", epochs=1),
                  on_event=events.append)
    assert child.resolved["n_replay_examples"] == 12 and child.resolved["n_train_examples"] == 24
    assert any("replaying 12 examples of the earlier training data" in e.message for e in events)
    alone = train(quick_config(str(parent.run_dir), data_dir / "more.jsonl", tmp_path / "alone", epochs=1,
                               replay=0.0))
    assert alone.resolved["n_replay_examples"] == 0 and alone.resolved["n_train_examples"] == 12


def test_replay_of_a_vanished_file(tiny_model_path, data_dir, tmp_path):
    import shutil

    from tunesmith.errors import DataError

    own = shutil.copy(data_dir / "train.jsonl", tmp_path / "first.jsonl")
    parent = train(quick_config(tiny_model_path, own, tmp_path / "parent", epochs=1, batch_size=12))
    (tmp_path / "first.jsonl").unlink()
    with pytest.raises(DataError) as caught:  # asked for explicitly: an error naming the file
        train(quick_config(str(parent.run_dir), data_dir / "more.jsonl", tmp_path / "strict", replay=0.5))
    assert "first.jsonl is gone" in str(caught.value.problems)
    events: list = []  # "auto": says what it cannot replay, trains on the new data
    child = train(quick_config(str(parent.run_dir), data_dir / "more.jsonl", tmp_path / "auto", epochs=1,
                               batch_size=12), on_event=events.append)
    assert child.resolved["n_replay_examples"] == 0
    assert any(e.message.startswith("not replayed:") for e in events)
