"""tunesmith export RUN --merged OUT: a merged model that generates like base + adapter."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tunesmith.errors import TunesmithError
from tunesmith.models.export import export_merged
from tunesmith.models.loading import load_causal_lm, load_tokenizer
from tunesmith.models.store import read_info

# peft calls a helper that transformers 5 marks deprecated when loading adapters
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")

CPU = torch.device("cpu")


def _greedy(model, tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_merged_export_generates_like_base_plus_adapter(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config, result, _ = trained("lora")
    out = export_merged(str(result.run_dir), tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out)
    with_adapter = PeftModel.from_pretrained(load_causal_lm(config.model, device=CPU), result.final_dir).eval()
    tokenizer = load_tokenizer(out)
    assert tokenizer.chat_template and read_info(out).end_of_turn == "<|im_end|>"
    for prompt in ("code for amber", "code for heron"):
        assert _greedy(merged, tokenizer, prompt) == _greedy(with_adapter, tokenizer, prompt)
    ids = torch.tensor([tokenizer.encode("code for maple")])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, with_adapter(ids).logits, rtol=1e-4, atol=1e-4)


def test_full_run_export_is_a_copy_of_its_model(trained, tmp_path):
    _, result, _ = trained("full")
    out = export_merged(str(result.run_dir), tmp_path / "copy")
    assert (out / "model.safetensors").read_bytes() == (result.final_dir / "model.safetensors").read_bytes()


def test_export_refuses_nan_and_writes_nothing(trained, tmp_path):
    _, result, _ = trained("lora")
    broken = tmp_path / "broken-run"
    shutil.copytree(result.run_dir, broken)
    weights = broken / "final" / "adapter_model.safetensors"
    state = load_file(str(weights))
    key = next(k for k in state if "lora_B" in k)
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, str(weights))
    with pytest.raises(TunesmithError, match="NaN"):
        export_merged(str(broken), tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]


def test_export_refuses_unfinished_runs_and_taken_folders(trained, tmp_path):
    _, result, _ = trained("lora")
    with pytest.raises(TunesmithError, match="not a tunesmith run"):
        export_merged(str(tmp_path), tmp_path / "out")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "something").write_text("x")
    with pytest.raises(TunesmithError, match="not empty"):
        export_merged(str(result.run_dir), taken)
