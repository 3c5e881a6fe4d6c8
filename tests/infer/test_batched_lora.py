"""Batched LoRA against peft's own mixed-adapter forward: every grouping of rows gives peft's logits."""

from __future__ import annotations

import copy

import pytest
import torch

from tunesmith.infer.batched_lora import BatchedLora, _Groups
from tunesmith.models.loading import load_causal_lm

ADAPTERS = {f"s{i}": rank for i, rank in enumerate((4, 8, 2, 4, 8, 4), start=1)}  # slots 1-6, mixed ranks


@pytest.fixture(scope="module")
def models(tiny_model_path):
    """(model with batched LoRA, peft's model): six random adapters on every linear layer of the tiny model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = load_causal_lm(tiny_model_path, device=torch.device("cpu"), dtype=torch.float32)
    model = None
    for name, rank in ADAPTERS.items():
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False)
        if model is None:
            model = get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    with torch.no_grad():  # big enough that every adapter changes the logits clearly
        for param_name, param in model.named_parameters():
            if "lora_" in param_name:
                param.mul_(10)
    reference = copy.deepcopy(model).eval()
    lora = BatchedLora()
    lora.rebuild(model)
    assert lora.slots == {name: slot for slot, name in enumerate(ADAPTERS, start=1)}
    return model.eval(), lora, reference


@pytest.mark.parametrize("adapters", [
    ["s2", "s2", "s2"],                 # one group, the rows as they come
    ["s1", "s2", "s3", "s4"],           # one row per slot, in slot order
    ["s3", "s2", "s1"],                 # one row per slot, reordered
    ["s1", "s1", "s2", None],           # lined up already, the base row last (the scheduler's order)
    ["s4", "s1", None, "s4", "s1"],     # reordered, a base row, two empty slots inside the span
    ["s6", None, "s1", "s6"],           # scattered slots: copied, not viewed; padding
], ids=["one-adapter", "in-order", "reordered", "base-last", "padded-span", "scattered"])
@pytest.mark.parametrize("tokens", [1, 5], ids=["decode", "prefill"])
def test_every_grouping_gives_peft_mixed_batch_logits(models, adapters, tokens):
    model, lora, reference = models
    torch.manual_seed(1)
    ids = torch.randint(0, 1000, (len(adapters), tokens))
    with torch.inference_mode():
        expected = reference(input_ids=ids, adapter_names=[a or "__base__" for a in adapters]).logits
        with lora.rows(adapters[1:] + adapters[:1], ids.device):  # the same row count, another grouping, first
            model(input_ids=ids)
        with lora.rows(adapters, ids.device):
            got = model(input_ids=ids).logits
        plain = model(input_ids=ids).logits  # outside rows(): the base model
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for row, adapter in enumerate(adapters):  # the adapters really change the rows they apply to
        assert torch.equal(got[row], plain[row]) == (adapter is None), row


def test_groups_view_close_slots_and_copy_scattered_ones():
    in_order = _Groups.of([1, 2, 3], torch.device("cpu"))
    assert (in_order.take, in_order.size, in_order.select(torch.arange(8)).tolist()) == (None, 1, [1, 2, 3])
    base_last = _Groups.of([1, 1, 2, 2, 0], torch.device("cpu"))
    assert (base_last.take, base_last.lined, base_last.size) == (None, 4, 2)
    padded = _Groups.of([3, 1, 0, 3], torch.device("cpu"))  # slots 1..3 viewed; slot 2 empty
    assert padded.size == 2 and padded.take.tolist() == [1, 4, 4, 4, 0, 3]
    assert padded.put.tolist() == [1, 0, 0, 0, 0, 3]
    assert padded.select(torch.arange(8)).tolist() == [1, 2, 3]
    scattered = _Groups.of([6, 1], torch.device("cpu"))  # a span of 6 for 2 used slots: copy those two
    assert scattered.select(torch.arange(8)).tolist() == [1, 6] and scattered.take.tolist() == [1, 0]
    assert _Groups.of([0, 0], torch.device("cpu")) is None
