"""The real SmolLM2-135M: LoRA and full fine-tuning run a few steps, and their artefacts load
with peft / transformers and stop generating at the end-of-turn token."""

from __future__ import annotations

import pytest
import torch

from tunesmith.train.config import TrainConfig
from tunesmith.train.recipe import train
from tunesmith.train.runs import resolve_run

pytestmark = [pytest.mark.integration,
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing")]  # peft vs transformers 5


def _answer(model, tokenizer, generation_config) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "code for amber"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=generation_config,
                             max_new_tokens=24, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def _config(data_dir, out, method: str, batch_size: int) -> TrainConfig:
    return TrainConfig(model="smollm2-135m", data=str(data_dir / "train.jsonl"), out=str(out), method=method,
                       epochs=1, batch_size=batch_size, max_length=64, device="cpu", seed=1)


def test_lora_on_smollm2_loads_with_peft(smollm2_path, data_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    result = train(_config(data_dir, tmp_path / "lora", "lora", batch_size=6))
    assert result.status == "succeeded" and result.steps == 2
    run = resolve_run(str(result.run_dir))
    assert run.base_model == "smollm2-135m" and run.is_adapter
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2_path), run.final_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(run.final_dir)
    generation = GenerationConfig.from_pretrained(run.final_dir)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn in ([generation.eos_token_id] if isinstance(generation.eos_token_id, int)
                           else generation.eos_token_id)
    answer = _answer(model, tokenizer, generation)
    assert answer and (end_of_turn not in answer or answer.index(end_of_turn) == len(answer) - 1)


def test_full_on_smollm2_loads_with_transformers(smollm2_path, data_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    result = train(_config(data_dir, tmp_path / "full", "full", batch_size=6))
    assert result.status == "succeeded" and result.steps == 2
    assert result.resolved["learning_rate"] == pytest.approx(2e-5 * (1e8 / result.resolved["total_parameters"]) ** 0.5)
    final = result.final_dir
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    base = AutoModelForCausalLM.from_pretrained(smollm2_path)
    changed = [name for name, p in model.named_parameters()
               if not torch.equal(p, dict(base.named_parameters())[name])]
    assert len(changed) == len(list(model.parameters()))  # every weight trained
    tokenizer = AutoTokenizer.from_pretrained(final)
    answer = _answer(model, tokenizer, GenerationConfig.from_pretrained(final))
    assert answer
