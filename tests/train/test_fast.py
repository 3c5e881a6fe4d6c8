"""The fast training step (packing, per-example attention, labelled-only output layer) equals the padded path."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from tunesmith.models.loading import load_causal_lm
from tunesmith.train import fast

CPU = torch.device("cpu")


def _examples(lengths, vocab: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Random token ids; the first 60% of each example is prompt (label -100), the rest is trained."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, vocab, (n,), generator=generator).tolist()
        prompt = int(n * 0.6)
        out.append((ids, [-100] * prompt + ids[prompt:]))
    return out


def _padded_loss(model, examples, pad_id: int = 0) -> torch.Tensor:
    """The plain path: right-padded batch, attention mask, transformers' own mean loss."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, :len(ids)], labels[row, :len(ids)], mask[row, :len(ids)] = (
            torch.tensor(ids), torch.tensor(lab), 1)
    return model(input_ids=input_ids, attention_mask=mask, labels=labels).loss


def _packed_loss(model, examples, multiple_of: int = 1) -> torch.Tensor:
    batch = fast.pack_examples(examples, multiple_of)
    with fast.packed_attention(model):
        total, _correct = fast.packed_token_loss(model, batch, chunk_rows=7)
    return total / batch.labelled


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _assert_same_step(model, examples, atol=2e-5):
    plain = _padded_loss(model, examples)
    plain.backward()
    plain_grads = _grads(model)
    packed = _packed_loss(model, examples)
    packed.backward()
    packed_grads = _grads(model)
    assert packed.item() == pytest.approx(plain.item(), rel=1e-5)
    assert plain_grads.keys() == packed_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=atol, rtol=1e-3, msg=name)


def test_pack_shifts_targets_inside_each_example():
    batch = fast.pack_examples([([5, 6, 7], [-100, 6, 7]), ([8, 9], [-100, 9])])
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    # position t predicts token t+1 of its own example; an example's last token predicts nothing
    assert batch.targets.tolist() == [[6, 7, -100, 9, -100]]
    assert batch.cu_seqlens.tolist() == [0, 3, 5]
    assert (batch.tokens, batch.labelled, batch.max_seqlen) == (5, 3, 3)


def test_a_row_rounded_up_gets_a_filler_example_without_labels():
    batch = fast.pack_examples([([5, 6, 7], [-100, 6, 7]), ([8, 9], [-100, 9])], multiple_of=4)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert batch.targets.tolist() == [[6, 7, -100, 9, -100, -100, -100, -100]]
    assert batch.cu_seqlens.tolist() == [0, 3, 5, 8]  # the filler attends only to itself
    assert (batch.tokens, batch.labelled, batch.max_seqlen) == (5, 3, 3)
    exact = fast.pack_examples([([5, 6, 7, 8], [-100, 6, 7, 8])], multiple_of=4)
    assert exact.input_ids.shape == (1, 4) and exact.cu_seqlens.tolist() == [0, 4]
    assert fast.row_multiple(CPU) == 1 and fast.row_multiple(torch.device("cuda")) == 64


def test_the_filler_leaves_the_loss_and_gradients_unchanged(tiny_model_path):
    model = load_causal_lm(tiny_model_path, device=CPU, dtype=torch.float32).train()
    examples = _examples([23, 9, 31], model.config.vocab_size)
    exact = _packed_loss(model, examples)
    exact.backward()
    exact_grads = _grads(model)
    rounded = _packed_loss(model, examples, multiple_of=64)
    rounded.backward()
    rounded_grads = _grads(model)
    assert rounded.item() == pytest.approx(exact.item(), rel=1e-6)
    assert rounded_grads.keys() == exact_grads.keys() and exact_grads
    for name, grad in exact_grads.items():
        torch.testing.assert_close(rounded_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_moving_a_packed_batch_keeps_its_boundaries_on_the_host():
    batch = fast.pack_examples([([5, 6, 7], [-100, 6, 7]), ([8, 9], [-100, 9])]).to("meta")
    assert batch.input_ids.device.type == batch.position_ids.device.type == batch.targets.device.type == "meta"
    # attention reads them as ints in every layer: a device copy would be a GPU sync per layer
    assert batch.cu_seqlens.device.type == "cpu" and batch.cu_seqlens.tolist() == [0, 3, 5]


def test_pack_batches_keeps_the_order_and_batch_size():
    samples = [([i, i + 1], [-100, i + 1]) for i in range(5)]
    batches = fast.pack_batches(samples, [4, 0, 2, 1, 3], 2)
    assert [b.input_ids[0, ::2].tolist() for b in batches] == [[4, 0], [2, 1], [3]]


@pytest.mark.parametrize("bad", [[], [([], [])], [([1, 2], [1])]])
def test_pack_refuses_empty_or_mismatched_examples(bad):
    with pytest.raises(ValueError):
        fast.pack_examples(bad)


def test_full_fine_tuning_step_equals_the_padded_one(tiny_model_path):
    model = load_causal_lm(tiny_model_path, device=CPU, dtype=torch.float32).train()
    _assert_same_step(model, _examples([23, 9, 31, 17], model.config.vocab_size))


def _lora_model(path, seed: int):
    """The tiny model with LoRA r=4 on every linear layer, its ``B`` drawn with ``seed`` (zero at init)."""
    from peft import LoraConfig, get_peft_model

    model = load_causal_lm(path, device=CPU, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM")).train()
    torch.manual_seed(seed)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # zero at init: give the adapters something to propagate
            torch.nn.init.normal_(parameter, std=0.02)
    return model


def test_lora_step_equals_the_padded_one(tiny_model_path):
    model = _lora_model(tiny_model_path, seed=1)
    _assert_same_step(model, _examples([12, 30, 5], model.config.vocab_size, seed=1))


def test_gemma_sliding_window_is_kept_per_example(tiny_gemma_path):
    from transformers import AutoModelForCausalLM

    # a window shorter than the examples, so local layers really mask
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma_path, dtype=torch.float32, sliding_window=8).train()
    assert "sliding_attention" in model.config.layer_types
    _assert_same_step(model, _examples([21, 6, 14], model.config.vocab_size, seed=2))


def test_the_last_mlp_runs_only_at_labelled_rows_and_is_restored(tiny_model_path):
    model = load_causal_lm(tiny_model_path, device=CPU, dtype=torch.float32)
    layers = model.get_decoder().layers
    seen = {}
    for index in (0, len(layers) - 1):
        layers[index].mlp.down_proj.register_forward_hook(
            lambda module, args, out, index=index: seen.__setitem__(index, args[0].shape[1]))
    batch = fast.pack_examples(_examples([20, 11], model.config.vocab_size))
    fast.packed_token_loss(model, batch)
    assert seen == {0: batch.tokens, len(layers) - 1: batch.labelled}  # every row, then the labelled ones
    assert "forward" not in vars(layers[-1].mlp)


def test_packed_attention_is_restored_after_the_block(tiny_model_path):
    model = load_causal_lm(tiny_model_path, device=CPU, dtype=torch.float32)
    before = model.config._attn_implementation
    with fast.packed_attention(model):
        assert model.config._attn_implementation == fast.VARLEN_ATTENTION
    assert model.config._attn_implementation == before


def _attention_inputs(lengths, heads=4, kv_heads=2, dim=16, seed=0):
    """q, k, v leaves for a packed row of ``lengths`` (GQA when ``kv_heads`` < ``heads``) and its bounds."""
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(1, heads, total, dim, generator=generator).requires_grad_()
    k, v = (torch.randn(1, kv_heads, total, dim, generator=generator).requires_grad_() for _ in range(2))
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, bounds


def _reference_attention(q, k, v, lengths, grad, scale, dtype=torch.float64):
    """Per-example causal sdpa in ``dtype`` on copies of the leaves: (output ``[1, T, heads, dim]``, grads)."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    groups = q.shape[1] // k.shape[1]
    kk, vv = (t.repeat_interleave(groups, dim=1) for t in leaves[1:])
    pieces = [F.scaled_dot_product_attention(a, b, c, is_causal=True, scale=scale)
              for a, b, c in zip(*(t.split(lengths, dim=2) for t in (leaves[0], kk, vv)))]
    out = torch.cat(pieces, dim=2).transpose(1, 2)
    out.backward(grad.to(dtype))
    return out, [t.grad for t in leaves]


def test_tiled_attention_equals_sdpa_with_its_gradients(monkeypatch):
    lengths = [130, 300, 40, 512]  # tiled, tiled over several tiles, the flash kernel, the longest tiled
    q, k, v, bounds = _attention_inputs(lengths)
    tiled = []
    apply = fast._TiledCausalAttention.apply
    monkeypatch.setattr(fast._TiledCausalAttention, "apply", lambda q, *rest: tiled.append(q.shape[2]) or apply(q, *rest))
    out, _ = fast.varlen_sdpa_attention(None, q, k, v, None, scaling=0.3, cu_seq_lens_q=bounds)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref, ref_grads = _reference_attention(q, k, v, lengths, grad, 0.3)
    assert tiled == [130, 300, 512]
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=1e-5)
    for got, want in zip((q.grad, k.grad, v.grad), ref_grads):
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)


def test_tiled_attention_is_for_training_only():
    q, k, v, _ = _attention_inputs([200])
    assert fast._tiled_attention_pays(q, k, v)
    with torch.no_grad():
        assert not fast._tiled_attention_pays(q, k, v)  # inference keeps no probabilities: flash
    assert not fast._tiled_attention_pays(q.detach(), k.detach(), v.detach())


@pytest.mark.parametrize("amx", [False, True])
def test_bf16_attention_of_long_examples_picks_its_kernel_by_the_cpu(monkeypatch, amx):
    # Without AMX, bf16 attention of 128-512 tokens runs the tiled fp32 kernel; with AMX, the
    # flash kernel's bf16 forward. Both return bf16 and fp32-accurate gradients.
    monkeypatch.setattr(fast, "cpu_has_amx", lambda: amx)
    lengths = [150, 260]
    q, k, v, bounds = _attention_inputs(lengths, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = fast.varlen_sdpa_attention(None, q, k, v, None, scaling=0.25, cu_seq_lens_q=bounds)
    assert out.dtype == torch.bfloat16
    grad = torch.randn_like(out, dtype=torch.float32)
    out.float().backward(grad)
    exact, exact_grads = _reference_attention(q, k, v, lengths, grad, 0.25)
    bf16_inputs = [t.detach().bfloat16().float() for t in (q, k, v)]
    if amx:
        flash, _ = _reference_attention(*bf16_inputs, lengths, grad, 0.25, dtype=torch.bfloat16)
        torch.testing.assert_close(out, flash, atol=0, rtol=0)  # the same bf16 forward kernel
    else:
        fp32, _ = _reference_attention(*bf16_inputs, lengths, grad, 0.25, dtype=torch.float32)
        torch.testing.assert_close(out, fp32.bfloat16(), atol=1e-2, rtol=1e-2)  # fp32 math, rounded once
    for got, want in zip((q.grad, k.grad, v.grad), exact_grads):
        assert (got.double() - want).norm() / want.norm() < 5e-3


def test_lora_step_over_long_examples_equals_the_padded_one(tiny_model_path):
    model = _lora_model(tiny_model_path, seed=2)
    _assert_same_step(model, _examples([140, 33, 260], model.config.vocab_size, seed=4))


def test_packed_attention_under_bf16_autocast_has_sdpa_forward_and_fp32_accurate_gradients():
    torch.manual_seed(0)
    lengths = [37, 5, 60]
    q, k, v = (torch.randn(1, 4, sum(lengths), 16, requires_grad=True) for _ in range(3))
    k_small, v_small = (t.detach()[:, :2].clone().requires_grad_() for t in (k, v))  # GQA: 2 kv heads
    bounds = torch.tensor([0, 37, 42, 102], dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = fast.varlen_sdpa_attention(None, q, k_small, v_small, None, scaling=0.25, cu_seq_lens_q=bounds)
    grad = torch.randn_like(out, dtype=torch.float32)
    out.float().backward(grad)
    assert out.dtype == torch.bfloat16

    def reference(dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k_small, v_small)]
        kk, vv = (t.repeat_interleave(2, dim=1) for t in leaves[1:])
        pieces = [F.scaled_dot_product_attention(a, b, c, is_causal=True, scale=0.25)
                  for a, b, c in zip(*(t.split(lengths, dim=2) for t in (leaves[0].to(dtype), kk, vv)))]
        ref = torch.cat(pieces, dim=2).transpose(1, 2)
        ref.float().backward(grad)
        return ref, [t.grad for t in leaves]

    sdpa_out, sdpa_grads = reference(torch.bfloat16)
    exact_out, exact_grads = reference(torch.float64)
    torch.testing.assert_close(out, sdpa_out, atol=0, rtol=0)  # the same bf16 forward kernel
    for got, bf16, exact in zip((q.grad, k_small.grad, v_small.grad), sdpa_grads, exact_grads):
        error = (got.double() - exact).norm() / exact.norm()
        assert error < 5e-3  # bf16 inputs, fp32 backward
        assert error <= (bf16.double() - exact).norm() / exact.norm() * 1.1  # no worse than bf16 sdpa


@pytest.mark.parametrize("weight_trains", [True, False], ids=["row-chunks", "frozen-vocab-slices"])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_linear_cross_entropy_equals_full_logits(softcap, weight_trains):
    torch.manual_seed(0)
    hidden = torch.randn(13, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=weight_trains)
    targets = torch.randint(0, 50, (13,))
    targets[0] = 49  # a target in the last, partial slice
    total, correct = fast.linear_cross_entropy(hidden, weight, targets, chunk_rows=4, vocab_chunk=8,
                                               softcap=softcap)
    (total * 0.5).backward()
    got = (hidden.grad.clone(), weight.grad.clone() if weight_trains else None)
    hidden.grad = weight.grad = None
    logits = hidden @ weight.T
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    expected = F.cross_entropy(logits, targets, reduction="sum")
    (expected * 0.5).backward()
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert correct == int((logits.argmax(-1) == targets).sum())
    torch.testing.assert_close(got[0], hidden.grad)
    if weight_trains:
        torch.testing.assert_close(got[1], weight.grad)


def test_linear_cross_entropy_without_grad_computes_no_gradient(monkeypatch):
    torch.manual_seed(0)
    hidden, targets = torch.randn(13, 16), torch.randint(0, 50, (13,))
    weight = torch.randn(50, 16, requires_grad=True)  # a weight that trains, as in full fine-tuning
    expected = F.cross_entropy(hidden @ weight.detach().T, targets, reduction="sum")

    def no_gradient(*args, **kwargs):
        raise AssertionError("a gradient was computed under torch.no_grad")

    monkeypatch.setattr(fast, "_add_grad_of_weight", no_gradient)
    monkeypatch.setattr(fast, "_add_slice_product", no_gradient)
    with torch.no_grad():
        total, correct = fast.linear_cross_entropy(hidden, weight, targets, vocab_chunk=8)
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    assert correct == int(((hidden @ weight.detach().T).argmax(-1) == targets).sum())


def test_frozen_weight_loss_keeps_the_first_maximum_across_slices():
    hidden = torch.ones(1, 2)
    weight = torch.zeros(12, 2)
    weight[[3, 9]] = 1.0  # the same top logit in the first and the third slice
    for target, right in ((3, 1), (9, 0)):
        _, correct = fast.linear_cross_entropy(hidden, weight, torch.tensor([target]), vocab_chunk=4)
        assert correct == right


def test_linear_cross_entropy_under_bf16_autocast_stays_close():
    torch.manual_seed(0)
    hidden, weight = torch.randn(40, 32), torch.randn(300, 32) * 0.2
    targets = torch.randint(0, 300, (40,))
    exact = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, _ = fast.linear_cross_entropy(hidden, weight, targets)
    assert total.dtype == torch.float32
    assert total.item() == pytest.approx(exact.item(), rel=2e-2)


@pytest.mark.parametrize("weight_trains", [True, False], ids=["row-chunks", "frozen-vocab-slices"])
def test_linear_cross_entropy_gradients_under_bf16_autocast_stay_close(weight_trains):
    torch.manual_seed(0)
    hidden = torch.randn(40, 32, requires_grad=True)
    weight = (torch.randn(300, 32) * 0.2).requires_grad_(weight_trains)
    targets = torch.randint(0, 300, (40,))
    F.cross_entropy(hidden @ weight.T, targets, reduction="sum").backward()
    exact = (hidden.grad.clone(), weight.grad.clone() if weight_trains else None)
    hidden.grad = weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, _ = fast.linear_cross_entropy(hidden, weight, targets, chunk_rows=16, vocab_chunk=64)
    total.backward()
    for got, want in zip((hidden.grad, weight.grad), exact):
        if want is None:
            continue
        assert got.dtype == torch.float32
        assert (got - want).norm() / want.norm() < 1e-2


@pytest.mark.parametrize("weight_trains", [True, False], ids=["row-chunks", "frozen-vocab-slices"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_with_reused_buffers_equals_fresh_ones(dtype, weight_trains):
    torch.manual_seed(0)
    weight = torch.randn(300, 32, requires_grad=weight_trains)
    results = {}
    for reuse in (False, True):
        context = fast.reused_loss_buffers() if reuse else contextlib.nullcontext()
        with context, torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            for rows in (40, 9, 40):  # buffers shrink to a view, then grow back
                generator = torch.Generator().manual_seed(rows)
                hidden = torch.randn(rows, 32, generator=generator, requires_grad=True)
                targets = torch.randint(0, 300, (rows,), generator=generator)
                weight.grad = None
                total, correct = fast.linear_cross_entropy(hidden, weight, targets, chunk_rows=16, vocab_chunk=64)
                total.backward()
                results.setdefault(reuse, []).append((total.detach(), correct, hidden.grad,
                                                      weight.grad if weight_trains else hidden.grad))
    for fresh, reused in zip(results[False], results[True]):
        assert fresh[1] == reused[1]
        for a, b in zip(fresh[:1] + fresh[2:], reused[:1] + reused[2:]):
            assert torch.equal(a, b)


def test_batch_without_labels_gives_zero_loss_with_a_graph():
    hidden = torch.randn(0, 8, requires_grad=True)
    total, correct = fast.linear_cross_entropy(hidden, torch.randn(20, 8), torch.zeros(0, dtype=torch.long))
    total.backward()
    assert (total.item(), correct) == (0.0, 0)


def test_cast_weight_keeps_the_copy_of_a_frozen_weight_until_it_changes_or_dies():
    frozen = torch.nn.Parameter(torch.randn(8, 4), requires_grad=False)
    first = fast.cast_weight(frozen, torch.bfloat16)
    assert first.dtype == torch.bfloat16 and fast.cast_weight(frozen, torch.bfloat16) is first
    assert fast.cast_weight(frozen, torch.float32) is frozen
    with torch.no_grad():
        frozen.mul_(2.0)  # an in-place change: the copy is made again
    again = fast.cast_weight(frozen, torch.bfloat16)
    assert again is not first
    torch.testing.assert_close(again, (frozen * 1).to(torch.bfloat16), atol=0, rtol=0)
    trained = torch.nn.Parameter(torch.randn(8, 4))
    assert fast.cast_weight(trained, torch.bfloat16) is not fast.cast_weight(trained, torch.bfloat16)
    key = id(frozen)
    del frozen, first, again
    assert key not in fast._FROZEN_CASTS


def _with_lora(make_net, target_modules: list[str], dropout: float = 0.0):
    """A seeded ``make_net()`` under peft LoRA r=3, with nonzero ``B`` so the adapters change the output."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = get_peft_model(make_net(), LoraConfig(r=3, lora_alpha=6, lora_dropout=dropout,
                                                target_modules=target_modules))
    for name, parameter in net.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    return net


def _lora_on_linear(bias: bool, dropout: float):
    return _with_lora(lambda: torch.nn.Sequential(torch.nn.Linear(12, 10, bias=bias)), ["0"], dropout)


@pytest.mark.parametrize("bias", [False, True])
def test_fused_lora_equals_peft(bias):
    net = _lora_on_linear(bias, dropout=0.0)
    x = torch.randn(2, 5, 12, requires_grad=True)
    reference = net(x)
    reference.square().sum().backward()
    expected = [x.grad.clone()] + [p.grad.clone() for p in net.parameters() if p.requires_grad]
    x.grad = None
    net.zero_grad(set_to_none=True)
    with fast.fused_lora(net) as n_fused:
        fused = net(x)
    fused.square().sum().backward()
    got = [x.grad] + [p.grad for p in net.parameters() if p.requires_grad]
    assert n_fused == 1
    torch.testing.assert_close(fused, reference)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


class _Siblings(torch.nn.Module):
    """q/k/v and gate/up read one input each, as in a decoder layer; o_proj reads another."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(12, 10, bias=True), torch.nn.Linear(12, 6),
                                                 torch.nn.Linear(12, 6))
        self.o_proj = torch.nn.Linear(10, 12)
        self.gate_proj, self.up_proj = torch.nn.Linear(12, 8, bias=False), torch.nn.Linear(12, 8, bias=False)

    def forward(self, x, y=None):
        y = x if y is None else y
        q, k, v = self.q_proj(x), self.k_proj(y), self.v_proj(x)  # with y: k reads another input
        h = self.o_proj(q) + (k * v).sum(-1, keepdim=True)
        return torch.nn.functional.silu(self.gate_proj(h)) * self.up_proj(h)


def _lora_siblings():
    return _with_lora(_Siblings, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"])


@pytest.mark.parametrize("other_input", [False, True])
def test_fused_lora_groups_layers_on_one_input_and_equals_peft(other_input):
    net = _lora_siblings()
    x = torch.randn(2, 5, 12, requires_grad=True)
    y = torch.randn(2, 5, 12) if other_input else None

    def run():
        x.grad = None
        net.zero_grad(set_to_none=True)
        out = net(x, y)
        out.square().sum().backward()
        return out.detach(), [x.grad.clone()] + [p.grad.clone() for p in net.parameters() if p.requires_grad]

    reference, expected = run()
    with fast.fused_lora(net) as n_fused:
        fused, got = run()
        groups = fast._shared_input_groups(fast._plain_lora_layers(net))
    assert n_fused == 6
    assert sorted(len(g) for g in groups) == [1, 2, 3]  # q/k/v, gate/up, o_proj alone
    torch.testing.assert_close(fused, reference)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    assert all("forward" not in vars(m) for m in net.modules())  # peft's own forwards are back


def test_fused_lora_runs_in_the_autocast_dtype():
    net = _lora_siblings()
    x = torch.randn(2, 5, 12, requires_grad=True)
    attention = net.base_model.model

    def run():
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            q, k, v = attention.q_proj(x), attention.k_proj(x), attention.v_proj(x)
        (q.float().square().sum() + (k.float() * v.float()).sum()).backward()
        return q, x.grad.clone()

    reference, reference_grad = run()
    with fast.fused_lora(net):
        fused, fused_grad = run()
    assert fused.dtype == reference.dtype == torch.bfloat16
    assert fused_grad.dtype == torch.float32  # the input's dtype: the layers' gradients summed in fp32
    torch.testing.assert_close(fused.float(), reference.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fused_grad, reference_grad, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_fused_rms_norm_equals_transformers(kind):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(16, eps=1e-5) if kind == "llama" else Gemma3RMSNorm(16, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    net = torch.nn.Sequential(norm)
    x = torch.randn(2, 7, 16, requires_grad=True)

    def run():
        x.grad, norm.weight.grad = None, None
        out = net(x)
        (out * torch.linspace(-1, 1, 16)).square().sum().backward()
        return out.detach(), x.grad.clone(), norm.weight.grad.clone()

    expected = run()
    with fast.fused_rms_norm(net) as n_fused:
        got = run()
    assert n_fused == 1 and "forward" not in vars(norm)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rotary_equals_transformers_and_is_restored(dtype):
    from transformers.models.llama import modeling_llama
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    original = modeling_llama.apply_rotary_pos_emb
    torch.manual_seed(0)
    # queries and keys as attention makes them (a transposed view; 4 query heads, 2 key heads)
    q = torch.randn(2, 5, 4, 8).to(dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 5, 2, 8).to(dtype).transpose(1, 2).requires_grad_()
    cos, sin = torch.randn(2, 5, 8), torch.randn(2, 5, 8)  # halves differ: no layout assumed

    def run():
        q.grad = k.grad = None
        q_out, k_out = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin)
        (q_out.float().square().sum() + (k_out.float() * 3).sum()).backward()
        return q_out.detach(), k_out.detach(), q.grad.clone(), k.grad.clone()

    expected = run()
    attention = LlamaAttention(LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2), 0)
    with fast.fused_rotary(attention) as n_outer, fast.fused_rotary(attention) as n_inner:
        assert modeling_llama.apply_rotary_pos_emb is not original
        got = run()
    assert (n_outer, n_inner) == (1, 1) and modeling_llama.apply_rotary_pos_emb is original
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype  # fp32 out of bf16 queries, as transformers' promotion gives
        tolerance = {} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
        torch.testing.assert_close(g, e, **tolerance)


def test_fused_lora_drops_out_in_training_only_and_is_restored():
    net = _lora_on_linear(False, dropout=0.5)
    x = torch.randn(4, 12)
    with torch.no_grad(), fast.fused_lora(net):
        net.eval()
        assert torch.equal(net(x), net(x))
        net.train()
        torch.manual_seed(3)
        first = net(x)
        torch.manual_seed(3)
        assert torch.equal(first, net(x))  # seeded: reproducible
        assert not torch.equal(first, net(x))  # but a new mask each call
    assert "forward" not in vars(net.base_model.model[0])  # peft's own forward is back
