"""The model registry, conversion cache, templates and the `models` CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tunesmith.errors import NotFoundError
from tunesmith.models.loading import apply_chat_template_and_eos, load_tokenizer
from tunesmith.models.store import META_FILE, read_info, resolve_model


def test_unknown_model_names_the_known_ones():
    with pytest.raises(NotFoundError) as err:
        resolve_model("gpt-17")
    assert "unknown model 'gpt-17'" in err.value.message
    assert "smollm2-135m" in err.value.hint and "gemma3-270m" in err.value.hint


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(NotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_missing_gguf_file_is_refused(tmp_path):
    with pytest.raises(NotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "nope.gguf"))


def test_smollm2_is_converted_with_its_own_template(smollm2_path):
    info = read_info(smollm2_path)
    assert info.chat_template_source == "model"
    assert info.end_of_turn == "<|im_end|>"
    gen = json.loads((smollm2_path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2
    assert (smollm2_path / "model.safetensors").is_file()


def test_gemma3_gets_a_template_from_its_turn_tokens(gemma3_path):
    info = read_info(gemma3_path)
    assert info.chat_template_source == "tunesmith:gemma-turns"
    tok = load_tokenizer(gemma3_path)
    assert len(tok) == 262144
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                   tokenize=False)
    assert text == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\nyo<end_of_turn>\n"
    gen = json.loads((gemma3_path / "generation_config.json").read_text())
    assert gen["eos_token_id"][0] == tok.convert_tokens_to_ids("<end_of_turn>")


@pytest.mark.integration
def test_converted_logits_match_the_gguf(smollm2_path):
    """The cached safetensors model computes exactly what transformers computes from the GGUF."""
    from transformers import AutoModelForCausalLM

    from tunesmith.models.registry import REGISTRY

    gguf = REGISTRY["smollm2-135m"].locate_gguf(smollm2_path)
    ids = torch.tensor([[1, 504, 3458, 282, 4195, 314]])
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    cached = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, cached(ids).logits)


def test_plain_folder_without_template_gets_one(tiny_model_path, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    tok.chat_template = None
    source, end_of_turn, eos_ids = apply_chat_template_and_eos(tok)
    assert source == "tunesmith:chatml" and end_of_turn == "<|im_end|>" and eos_ids == [2]


def test_half_written_cache_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_MODELS_DIR", str(tmp_path))
    (tmp_path / "smollm2-135m").mkdir()
    (tmp_path / "smollm2-135m" / "config.json").write_text("{}")
    with pytest.raises(NotFoundError, match="not prepared"):
        resolve_model("smollm2-135m", prepare=False)
    assert not (tmp_path / "smollm2-135m" / META_FILE).exists()


def test_models_list_cli_shows_both_models(smollm2_path):
    out = subprocess.run([sys.executable, "-m", "tunesmith", "models", "list"], capture_output=True, text=True,
                         env={**__import__("os").environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    assert "smollm2-135m" in out.stdout and "gemma3-270m" in out.stdout
    assert "LlamaForCausalLM" in out.stdout and "Gemma3ForCausalLM" in out.stdout


def test_unknown_model_cli_exits_nonzero_without_traceback():
    out = subprocess.run([sys.executable, "-m", "tunesmith", "models", "pull", "gpt-17"],
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert "unknown model 'gpt-17'" in out.stderr and "Traceback" not in out.stderr
