"""Decode linears: the split product gives F.linear's values, and only decode steps take it."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
import torch.nn.functional as F

from tunesmith.infer.decode_linear import CALIBRATED_ROWS, split_linear, use_fastest_decode_linears
from tunesmith.models.loading import load_causal_lm


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("blocks", [2, 4])
def test_split_linear_equals_f_linear(rows, blocks):
    torch.manual_seed(0)
    weight, bias, x = torch.randn(96, 64), torch.randn(96), torch.randn(rows, 64)
    out = split_linear(x, weight, bias, blocks)
    assert out.is_contiguous()
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split_linear(x, weight, None, blocks), F.linear(x, weight), rtol=1e-5, atol=1e-5)


def _always(weights, rows, blocks):
    return True


@contextlib.contextmanager
def _two_threads():
    """Two torch threads (two row blocks), whatever the machine's count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture()
def models(tiny_model_path):
    """(plain, routed): the tiny model twice, the second with every decode linear forced to the split form."""
    plain = load_causal_lm(tiny_model_path, device=torch.device("cpu"), dtype=torch.float32).eval()
    routed = load_causal_lm(tiny_model_path, device=torch.device("cpu"), dtype=torch.float32).eval()
    with _two_threads():
        chosen = use_fastest_decode_linears(routed, wins=_always)
    assert chosen and all(rows == CALIBRATED_ROWS for rows in chosen.values())
    return plain, routed


def test_batched_greedy_decoding_matches_the_plain_model(models):
    plain, routed = models
    ids = torch.randint(10, 1000, (4, 7), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
        expected = plain.generate(ids, **kwargs)
        torch.testing.assert_close(routed(ids[:, -1:]).logits, plain(ids[:, -1:]).logits, rtol=1e-4, atol=1e-5)
        assert torch.equal(routed.generate(ids, **kwargs), expected)


def test_prefill_and_gradients_keep_f_linear(models):
    _, routed = models
    layer = routed.lm_head
    assert isinstance(layer.forward, functools.partial)
    many = torch.randn(CALIBRATED_ROWS[-1] + 1, layer.in_features)  # more rows than a decode step
    with torch.inference_mode():
        assert torch.equal(layer(many), F.linear(many, layer.weight))
    few = torch.randn(2, layer.in_features, requires_grad=True)  # grad on: training, never the decode path
    assert torch.equal(layer(few), F.linear(few, layer.weight))
    layer(few).sum().backward()
    assert few.grad is not None


def test_a_row_count_takes_the_form_calibrated_for_the_next_count_up(tiny_model_path, monkeypatch):
    from tunesmith.infer import decode_linear

    model = load_causal_lm(tiny_model_path, device=torch.device("cpu"), dtype=torch.float32).eval()
    with _two_threads():
        use_fastest_decode_linears(model, wins=lambda weights, rows, blocks: rows == 4)
    split_calls = []
    monkeypatch.setattr(decode_linear, "split_linear",
                        lambda *args, real=decode_linear.split_linear: split_calls.append(1) or real(*args))
    layer = model.lm_head
    taken = {}
    with torch.inference_mode():
        for rows in (1, 2, 3, 4, 5, 8):
            x = torch.randn(rows, 1, layer.in_features)
            before = len(split_calls)
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=1e-5, atol=1e-5)
            taken[rows] = len(split_calls) > before
    assert taken == {1: False, 2: False, 3: True, 4: True, 5: False, 8: False}


def test_calibration_times_every_linear_shape_but_peft_matrices(tiny_model_path):
    from peft import LoraConfig, get_peft_model

    model = load_causal_lm(tiny_model_path, device=torch.device("cpu"), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"])).eval()
    seen = []

    def record(weights, rows, blocks):
        seen.append((tuple(weights[0].shape), rows))
        return rows == 2

    with _two_threads():
        chosen = use_fastest_decode_linears(model, wins=record)
    shapes = {tuple(m.weight.shape) for n, m in model.named_modules()
              if type(m) is torch.nn.Linear and ".lora_" not in n}
    assert set(chosen) == shapes and all(rows == (2,) for rows in chosen.values())
    assert sorted(seen) == sorted((shape, rows) for shape in shapes for rows in CALIBRATED_ROWS)
    # the timed calibration itself returns a choice for every shape
    plain = load_causal_lm(tiny_model_path, device=torch.device("cpu"), dtype=torch.float32).eval()
    timed = use_fastest_decode_linears(plain)
    assert set(timed) == {tuple(m.weight.shape) for m in plain.modules() if type(m) is torch.nn.Linear}
    assert all(set(rows) <= set(CALIBRATED_ROWS) for rows in timed.values())
