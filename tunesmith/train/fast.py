"""The fast training step: no compute on padding, the output layer only where there is a label.

A plain causal-LM step pads a batch to its longest example and projects every
position onto the whole vocabulary. For chat fine-tuning both are mostly waste:
padding is a quarter of a batch of mixed-length examples, and only the assistant
tokens (a third or less of a chat) carry a label, while the vocabulary projection
is the largest matmul of a small model (Gemma 3 270M's output layer costs more
than all its transformer blocks).

So a batch here is *packed*: its examples laid end to end in one row, position ids
restarting at each example, and attention computed example by example
(:func:`varlen_sdpa_attention`, the CPU counterpart of flash-attention's varlen
kernel; on the CPU, examples of 128-512 tokens train through tiled batched matmuls,
:class:`_TiledCausalAttention`, faster there than PyTorch's flash kernel). The
decoder's hidden states are then gathered at the labelled positions only, and the
output layer plus cross-entropy runs on those rows in chunks
(:func:`linear_cross_entropy`), computing the gradient on the way forward so the
full logits never exist at once. Plain LoRA layers run fused autograd functions
that fold the adapter's scale and sum into ``addmm`` and run the layers that read
one input (q/k/v, gate/up) together (:func:`fused_lora`); RMSNorm and the
rotary embedding run hand-written backwards (:func:`fused_rms_norm`,
:func:`fused_rotary`).

The recipe calls two functions: :func:`pack_batches` where it would pad, and
:func:`packed_token_loss` where it would run the model and the loss. bf16 autocast
pays on CPUs with AMX or AVX512-BF16 (``models.loading.cpu_has_fast_bf16``). Each piece gives
the plain padded path's loss and gradients (tests/train/test_fast.py); the
measurements that chose them are in bench/RESULTS.md.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import weakref
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from tunesmith.models.loading import cpu_has_amx

IGNORE_INDEX = -100
VARLEN_ATTENTION = "tunesmith_varlen_sdpa"


# --------------------------------------------------------------------------- packing


@dataclass
class PackedBatch:
    """The examples of one batch laid end to end in a single row, without padding.

    ``targets[t]`` is the token that position ``t`` must predict (already shifted,
    within its own example), or ``IGNORE_INDEX``; ``cu_seqlens`` are the example
    boundaries ``[0, len0, len0+len1, ...]`` as in flash-attention's varlen API.
    ``tokens`` and ``labelled`` count real tokens and tokens that carry loss.
    """

    input_ids: torch.Tensor  # [1, T] long
    position_ids: torch.Tensor  # [1, T] long
    targets: torch.Tensor  # [1, T] long
    cu_seqlens: torch.Tensor  # [n + 1] int32
    max_seqlen: int
    tokens: int
    labelled: int

    def to(self, device: torch.device | str) -> "PackedBatch":
        """The same batch with its tensors on ``device``, but for ``cu_seqlens``, which stays on the host.

        Attention reads the boundaries as Python ints in every layer: on a GPU a
        device copy would make each read a synchronisation, stalling the CPU that
        queues the kernels (the step is launch-bound at these model sizes).
        """
        return PackedBatch(self.input_ids.to(device), self.position_ids.to(device), self.targets.to(device),
                           self.cu_seqlens, self.max_seqlen, self.tokens, self.labelled)


def pack_examples(examples: Sequence, multiple_of: int = 1) -> PackedBatch:
    """Pack examples (objects with ``input_ids`` and ``labels``, or such pairs) into one row.

    Labels follow the transformers convention: unshifted, ``-100`` where no loss
    is taken. The shift happens here, inside each example, so no example
    predicts the first token of the next. With ``multiple_of`` > 1 the row is
    rounded up to that multiple by a filler example of token 0 without labels
    (:func:`row_multiple`); it attends only to itself and ``tokens`` leaves it out.

    Raises:
        ValueError: no examples, an empty example, or labels of another length.
    """
    if not examples:
        raise ValueError("cannot pack an empty batch")
    ids: list[int] = []
    positions: list[int] = []
    targets: list[int] = []
    bounds = [0]
    for index, example in enumerate(examples):
        input_ids, labels = (example if isinstance(example, tuple) else (example.input_ids, example.labels))
        n = len(input_ids)
        if n == 0 or len(labels) != n:
            raise ValueError(f"example {index}: {n} tokens and {len(labels)} labels")
        ids.extend(input_ids)
        positions.extend(range(n))
        targets.extend(labels[1:])
        targets.append(IGNORE_INDEX)  # the last token of an example predicts nothing
        bounds.append(bounds[-1] + n)
    real = len(ids)
    filler = -real % multiple_of
    if filler:
        ids.extend([0] * filler)
        positions.extend(range(filler))
        targets.extend([IGNORE_INDEX] * filler)
        bounds.append(bounds[-1] + filler)
    target_tensor = torch.tensor([targets], dtype=torch.long)
    return PackedBatch(
        input_ids=torch.tensor([ids], dtype=torch.long),
        position_ids=torch.tensor([positions], dtype=torch.long),
        targets=target_tensor,
        cu_seqlens=torch.tensor(bounds, dtype=torch.int32),
        max_seqlen=max(b - a for a, b in zip(bounds, bounds[1:])),
        tokens=real,
        labelled=int((target_tensor != IGNORE_INDEX).sum()),
    )


def pack_batches(samples: Sequence, order: Sequence[int], batch_size: int,
                 multiple_of: int = 1) -> list[PackedBatch]:
    """Group ``samples`` in ``order`` into packed batches of ``batch_size`` examples (the last may be smaller).

    The same examples make each step as in padded batching, so the gradient is
    the padded path's; nothing is padded but the filler ``multiple_of`` asks for.
    """
    return [pack_examples([samples[i] for i in order[start:start + batch_size]], multiple_of)
            for start in range(0, len(order), batch_size)]


def row_multiple(device: torch.device) -> int:
    """The multiple a packed row's length is rounded up to on ``device``: 64 on a GPU, 1 (none) elsewhere.

    On a GPU the step is launch-bound at these model sizes, and cuBLAS chooses its
    kernel afresh for every matrix shape it has not met: a bf16 matmul with a new
    row count cost 233 us of CPU time against 16 us for a shape seen before
    (H200, bench/RESULTS_GPU.md). A packed row has a new length nearly every step,
    and about 47 matmuls a layer take it as their row count. Rounded up to a
    multiple of 64, a run meets a few dozen lengths, each once; the filler is
    at most 63 tokens of compute the GPU has to spare. On a CPU it would only
    add compute, so the row stays exact.
    """
    return 64 if device.type == "cuda" else 1


# --------------------------------------------------------------------------- attention


def varlen_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, sliding_window: int | None = None,
                          cu_seq_lens_q: torch.Tensor | None = None, **kwargs):
    """Causal attention computed separately for each packed example (transformers attention interface).

    PyTorch has no variable-length attention kernel on the CPU; the packed-mask
    alternative (transformers' block-diagonal mask over the whole row) computes
    the full ``T x T`` scores and throws most away, and loses sdpa's causal fast
    path. One causal sdpa call per example costs only ``sum(len_i^2)``.

    Args:
        query/key/value: ``[1, heads, T, head_dim]`` (keys may have fewer heads: GQA).
        cu_seq_lens_q: example boundaries (from :class:`PackedBatch`); None means one sequence.
        sliding_window: local-attention window of this layer (Gemma), if any.

    Returns:
        (``[1, T, heads, head_dim]`` output, None).
    """
    if attention_mask is not None:
        raise ValueError("packed attention takes no attention mask: pass cu_seq_lens_q")
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        # repeat_kv instead of enable_gqa: the CPU flash kernel is faster on equal heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    total = query.shape[2]
    bounds = [0, total] if cu_seq_lens_q is None else cu_seq_lens_q.tolist()
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    # split, not slicing: the backward of a split is one cat, while each slice's backward
    # fills a zero tensor of the whole row and adds into it (3 x examples x layers passes)
    outputs = []
    for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2)):
        mask = _sliding_causal_mask(q.shape[2], sliding_window, q.device)
        if mask is None and dropout == 0.0 and q.device.type == "cpu":
            outputs.append(_cpu_causal_attention(q, k, v, scaling))
        else:
            outputs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                          is_causal=mask is None, scale=scaling))
    output = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    return output.transpose(1, 2).contiguous(), None


def _cpu_causal_attention(q, k, v, scale: float | None) -> torch.Tensor:
    """One example's causal attention on the CPU, by the kernel measured fastest for its length and precision.

    - fp32, training, 128-512 tokens: :class:`_TiledCausalAttention`.
    - bf16 (autocast or bf16 tensors) on a CPU without AMX: the same in fp32, where it applies;
      without AMX a bf16 product runs only about twice as fast as fp32, and the flash kernel
      gains nothing from it (bench/RESULTS_EPYC.md). The output comes back in bf16, as sdpa's.
    - bf16 otherwise: the flash kernel's bf16 forward, its fp32 backward (:func:`_cpu_flash_attention`).
    - fp32 otherwise: sdpa (the flash kernel).
    """
    if _reduced_precision_on_cpu(q):
        if not cpu_has_amx() and _tiled_attention_pays(q, k, v):
            dtype = _cpu_dtype(q)  # asked before autocast is turned off
            with torch.autocast("cpu", enabled=False):
                return _TiledCausalAttention.apply(q.float(), k.float(), v.float(), scale).to(dtype)
        return _cpu_flash_attention(q, k, v, scale)
    if q.dtype == torch.float32 and _tiled_attention_pays(q, k, v):
        return _TiledCausalAttention.apply(q, k, v, scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def _cpu_dtype(q: torch.Tensor) -> torch.dtype:
    """The dtype attention on the CPU computes in: autocast's where it is on, else the tensors' own."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype


def _reduced_precision_on_cpu(q: torch.Tensor) -> bool:
    """Whether this attention runs in bf16/fp16 on the CPU (autocast's dtype, or the tensors' own)."""
    return q.device.type == "cpu" and _cpu_dtype(q) in (torch.bfloat16, torch.float16)


class _FlashAttentionFp32Backward(torch.autograd.Function):
    """Causal attention on the CPU: PyTorch's flash kernel forward in bf16, its backward in fp32.

    The CPU flash backward in bf16 pays a fixed cost of about 1.5 ms a call on top of
    the work (1.9 ms at 150 tokens against 0.6 ms in fp32, level only near 440 tokens),
    and a packed step calls it once per example and layer. The fp32 backward, fed
    the bf16 forward's output and log-sum-exp, is faster across these lengths and
    rounds less: the bf16 LoRA step ran 8% faster (bench/RESULTS.md).
    """

    @staticmethod
    def forward(ctx, q, k, v, scale: float | None):
        out, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
        ctx.save_for_backward(q, k, v, out, logsumexp)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, logsumexp = ctx.saved_tensors
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad.float(), q.float(), k.float(), v.float(), out.float(), logsumexp, 0.0, True, scale=ctx.scale)
        return grads[0].to(q.dtype), grads[1].to(k.dtype), grads[2].to(v.dtype), None


def _cpu_flash_attention(q, k, v, scale: float | None) -> torch.Tensor:
    """Causal attention through :class:`_FlashAttentionFp32Backward`, in autocast's dtype where it is on."""
    if torch.is_autocast_enabled("cpu"):  # sdpa is on autocast's list; a direct aten call is not
        dtype = torch.get_autocast_dtype("cpu")
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    with torch.autocast("cpu", enabled=False):
        return _FlashAttentionFp32Backward.apply(q, k, v, scale)


# Example lengths (tokens) between which :class:`_TiledCausalAttention` trains faster than the CPU
# flash kernel: level at 140 tokens, the flash kernel faster under it; the upper bound caps the
# probabilities it keeps for the backward (9 heads x 512^2 floats, three fifths of them in tiles: about
# 6 MB an example and layer).
TILED_ATTENTION_TOKENS = (128, 512)
TILED_ATTENTION_BLOCK = 96  # query rows per tile: 64-128 measured alike, 96 the middle


def _tiled_attention_pays(q, k, v) -> bool:
    """Whether one example's attention is worth :class:`_TiledCausalAttention`: training, 128-512 tokens."""
    low, high = TILED_ATTENTION_TOKENS
    return (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
            and low <= q.shape[2] <= high)


def _row_tiles(length: int, block: int) -> list[tuple[int, int]]:
    """``[start, end)`` of the query-row tiles of an example: about ``block`` rows each."""
    n = max(1, round(length / block))
    bounds = [length * i // n for i in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


@functools.lru_cache(maxsize=64)
def _upper_triangle(size: int, device: torch.device) -> torch.Tensor:
    """``[size, size]``: -inf above the diagonal, 0 elsewhere (a tile's causal mask)."""
    return torch.full((size, size), float("-inf"), device=device).triu_(1)


class _TiledCausalAttention(torch.autograd.Function):
    """Causal attention of one example in fp32 as batched matmuls over row tiles, probabilities kept.

    PyTorch's CPU flash kernel runs at about 35-40 GFLOP/s a core on these shapes
    (64-wide heads, 100-500 tokens) against about 100 for a plain matmul, and its
    backward recomputes the probabilities. Here the query rows are cut into tiles of
    about :data:`TILED_ATTENTION_BLOCK`; a tile's scores are one ``bmm`` over every
    head, against the keys up to its last row only (the causal triangle is skipped
    but for the tile's own diagonal block), so MKL runs near its peak. The
    probabilities are kept for the backward, which is then four ``bmm`` a tile and
    two elementwise passes. Forward + backward with autograd, SmolLM2's heads: level
    with the flash kernel at 140 tokens, 1.22x at 290, 1.40x at 440; the LoRA step
    3.5-6.7% faster in fp32 (bench/RESULTS_EPYC.md). Same values to float rounding.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale: float | None):
        heads, length, dim = q.shape[1:]
        scale = dim ** -0.5 if scale is None else scale
        q0, k0, v0 = q[0], k[0], v[0]
        out = torch.empty(1, length, heads, dim, dtype=q.dtype, device=q.device).transpose(1, 2)
        probs = []
        for start, end in _row_tiles(length, TILED_ATTENTION_BLOCK):
            scores = torch.bmm(q0[:, start:end] * scale, k0[:, :end].transpose(1, 2))
            scores[:, :, start:end] += _upper_triangle(end - start, q.device)
            p = torch.softmax(scores, dim=-1)
            out[0, :, start:end] = torch.bmm(p, v0[:, :end])
            probs.append(p)
        ctx.save_for_backward(q, k, v, out, *probs)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, *probs = ctx.saved_tensors
        q0, k0, v0, g0 = q[0], k[0], v[0], grad[0]
        heads, length, dim = q0.shape
        # d loss / d scores = p * (dP - rowsum(dO * O)), the softmax's backward with its row term precomputed
        row_term = torch.linalg.vecdot(g0, out[0]).unsqueeze(-1)
        grad_q = torch.empty(1, length, heads, dim, dtype=q.dtype, device=q.device).transpose(1, 2)
        grad_k = grad_v = None
        # the last tile reaches every key: its products are the buffers the others add into
        for (start, end), p in reversed(list(zip(_row_tiles(length, TILED_ATTENTION_BLOCK), probs))):
            g = g0[:, start:end]
            grad_scores = torch.bmm(g, v0[:, :end].transpose(1, 2)).sub_(row_term[:, start:end]).mul_(p)
            grad_q[0, :, start:end] = torch.bmm(grad_scores, k0[:, :end]).mul_(ctx.scale)
            part_v = torch.bmm(p.transpose(1, 2), g)
            part_k = torch.bmm(grad_scores.transpose(1, 2), q0[:, start:end])
            if grad_k is None:
                grad_v, grad_k = part_v, part_k.mul_(ctx.scale)
            else:
                grad_v[:, :end] += part_v
                grad_k[:, :end].add_(part_k, alpha=ctx.scale)
        return grad_q, grad_k.unsqueeze(0), grad_v.unsqueeze(0), None


def _sliding_causal_mask(length: int, window: int | None, device) -> torch.Tensor | None:
    """None (plain causal) unless ``length`` exceeds the local-attention window."""
    if window is None or length <= window:
        return None
    q = torch.arange(length, device=device)[:, None]
    k = torch.arange(length, device=device)[None, :]
    return (k <= q) & (k > q - window)


def register_varlen_attention() -> str:
    """Register :func:`varlen_sdpa_attention` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_sdpa_attention)
    return VARLEN_ATTENTION


@contextlib.contextmanager
def packed_attention(model) -> Iterator[None]:
    """Within the block, ``model`` attends example by example; its attention is restored after.

    The model then creates no attention mask (transformers creates none for an
    attention implementation without a mask function), so the block is for
    packed training forwards only, never for generation with padding.
    """
    register_varlen_attention()
    configs = _configs(model)
    saved = [config._attn_implementation for config in configs]
    for config in configs:
        config._attn_implementation = VARLEN_ATTENTION
    try:
        yield
    finally:
        for config, value in zip(configs, saved):
            config._attn_implementation = value


def _configs(model) -> list:
    """The config objects of ``model`` and its submodules (each layer may hold its own reference)."""
    seen: dict[int, object] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            seen.setdefault(id(config), config)
    return list(seen.values())


# --------------------------------------------------------------------------- frozen weights


# id(weight) -> (a weak reference to it, (dtype, version, storage address), its copy in dtype)
_FROZEN_CASTS: dict[int, tuple] = {}


def cast_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` in ``dtype``; the copy of a frozen weight is kept and reused across steps.

    Under bf16 autocast every step casts every frozen base weight again (LoRA's
    base layers, the tied output layer): reading 540 MB and writing 270 MB a step
    in SmolLM2 to make the same copies. A frozen weight's copy is kept for as long
    as the weight lives and made again if the weight changes (its version counter
    or storage), so a weight that trains, or is replaced, is never served stale.
    """
    if weight.dtype == dtype:
        return weight
    if weight.requires_grad:
        return weight.to(dtype)
    stamp = (dtype, weight._version, weight.data_ptr())
    key = id(weight)
    cached = _FROZEN_CASTS.get(key)
    if cached is not None and cached[0]() is weight and cached[1] == stamp:
        return cached[2]
    copy = weight.detach().to(dtype)
    _FROZEN_CASTS[key] = (weakref.ref(weight, lambda _ref, key=key: _FROZEN_CASTS.pop(key, None)), stamp, copy)
    return copy


# --------------------------------------------------------------------------- LoRA


class _LoraLinear(torch.autograd.Function):
    """``x W^T + b + s * dropout(x) A^T B^T`` with the adapter's scale and sum folded into the matmuls.

    peft computes the same as ``base(x) + lora_B(lora_A(dropout(x))) * scaling``:
    three elementwise passes over the ``[tokens, out]`` output (scale, add, and in
    the backward their counterparts) per adapted layer, 210 layers in SmolLM2,
    and on a CPU each pass costs about as much as a skinny matmul. Here the scale
    and sum ride on ``addmm``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, dropout_p: float, compute_dtype):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(compute_dtype)
        w, a, b = cast_weight(weight, compute_dtype), lora_a.to(compute_dtype), lora_b.to(compute_dtype)
        mask = None
        if dropout_p > 0.0:
            mask = torch.empty_like(x2).bernoulli_(1.0 - dropout_p).div_(1.0 - dropout_p)
            xd = x2 * mask
        else:
            xd = x2
        u = xd @ a.T
        out = torch.addmm(bias.to(compute_dtype), x2, w.T) if bias is not None else x2 @ w.T
        out.addmm_(u, b.T, alpha=scaling)
        ctx.save_for_backward(xd, u, mask, w, a, b)
        ctx.scaling, ctx.shape = scaling, shape
        ctx.dtypes = (x.dtype, lora_a.dtype, lora_b.dtype, None if bias is None else bias.dtype)
        return out.reshape(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        xd, u, mask, w, a, b = ctx.saved_tensors
        x_dtype, a_dtype, b_dtype, bias_dtype = ctx.dtypes
        g = grad_out.reshape(-1, grad_out.shape[-1]).to(w.dtype)
        gu = (g @ b).mul_(ctx.scaling)  # [tokens, r]: gradient at the adapter's bottleneck
        grad_b = (g.T @ u).mul_(ctx.scaling).to(b_dtype)
        grad_a = (gu.T @ xd).to(a_dtype)
        grad_bias = g.sum(0).to(bias_dtype) if ctx.needs_input_grad[2] else None
        if not ctx.needs_input_grad[0]:
            return None, None, grad_bias, grad_a, grad_b, None, None, None
        if mask is None:
            grad_x = torch.addmm(g @ w, gu, a)
        else:
            grad_x = (gu @ a).mul_(mask).addmm_(g, w)
        return grad_x.to(x_dtype).reshape(ctx.shape), None, grad_bias, grad_a, grad_b, None, None, None


class _LoraGroup(torch.autograd.Function):
    """Several plain LoRA linears on one input (q/k/v, or gate/up), forward and backward in one function.

    The adapters' down-projections run as one matmul on the stacked ``A`` matrices,
    and the input gradient is one sum of products (:func:`_sum_of_products`). Computed
    layer by layer (peft, or :class:`_LoraLinear` per layer), each adapter reads the
    whole input twice more (``x A^T`` forward, ``A``'s gradient backward) in skinny
    matmuls that are memory-bound on a CPU, and autograd adds the layers' input
    gradients in separate passes. A group of one is a single plain LoRA linear.
    ``B``'s gradient is computed as ``(u^T g)^T``: the same product as ``g^T u``,
    which MKL runs at half the speed (bench/RESULTS.md).

    ``tensors`` holds, per member: base weight, base bias (or None), ``lora_A``, ``lora_B``.
    """

    @staticmethod
    def forward(ctx, x, scalings: tuple, compute_dtype, *tensors):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(compute_dtype)
        members = [tensors[i:i + 4] for i in range(0, len(tensors), 4)]
        weights = [cast_weight(w, compute_dtype) for w, _, _, _ in members]
        lora_b = [b.to(compute_dtype) for _, _, _, b in members]
        ranks = [a.shape[0] for _, _, a, _ in members]
        lora_a = torch.cat([a for _, _, a, _ in members]).to(compute_dtype)
        u = x2 @ lora_a.T  # [tokens, sum of ranks]: every adapter's bottleneck in one matmul
        outputs = []
        for (_, bias, _, _), w, b, u_i, scaling in zip(members, weights, lora_b, u.split(ranks, dim=1), scalings):
            out = torch.addmm(bias.to(compute_dtype), x2, w.T) if bias is not None else x2 @ w.T
            out.addmm_(u_i, b.T, alpha=scaling)
            outputs.append(out.reshape(*shape[:-1], out.shape[-1]))
        ctx.save_for_backward(x2, u, lora_a, *weights, *lora_b)
        ctx.scalings, ctx.ranks, ctx.shape = scalings, ranks, shape
        ctx.dtypes = [(None if bias is None else bias.dtype, a.dtype, b.dtype) for _, bias, a, b in members]
        ctx.x_dtype = x.dtype
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        x2, u, lora_a, *rest = ctx.saved_tensors
        n = len(ctx.scalings)
        weights, lora_b = rest[:n], rest[n:]
        gs = [g.reshape(-1, g.shape[-1]).to(x2.dtype) for g in grads]
        gu = torch.cat([(g @ b).mul_(s) for g, b, s in zip(gs, lora_b, ctx.scalings)], dim=1)
        grad_a = (gu.T @ x2).split(ctx.ranks, dim=0)
        grads_out = []
        for i, (g, u_i, s) in enumerate(zip(gs, u.split(ctx.ranks, dim=1), ctx.scalings)):
            bias_dtype, a_dtype, b_dtype = ctx.dtypes[i]
            grad_b = (u_i.T @ g).T.mul_(s).to(b_dtype)
            grad_bias = g.sum(0).to(bias_dtype) if ctx.needs_input_grad[3 + 4 * i + 1] else None
            grads_out += [None, grad_bias, grad_a[i].to(a_dtype), grad_b]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = _sum_of_products([(g, w) for g, w in zip(gs, weights)] + [(gu, lora_a)], ctx.x_dtype)
            grad_x = grad_x.reshape(ctx.shape)
        return (grad_x, None, None, *grads_out)


def _sum_of_products(pairs: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> torch.Tensor:
    """``sum(a @ b)`` in ``dtype``: one ``addmm`` chain when the products are in ``dtype`` already.

    Under bf16 autocast each product is rounded to bf16 once and the sum is taken
    in ``dtype`` (fp32), as autograd sums the input gradients of separate layers:
    a chain of ``addmm_`` into a bf16 buffer would round after every term.
    """
    (a, b), rest = pairs[0], pairs[1:]
    total = a @ b
    if total.dtype == dtype:
        for a, b in rest:
            total.addmm_(a, b)
        return total
    total = total.to(dtype)
    for a, b in rest:
        total.add_(a @ b)
    return total


# Sibling layers that read the same input in the decoders transformers ships (Llama, Qwen, Mistral,
# Gemma, SmolLM...). A model that calls them otherwise still gets the right answer: a group
# computes its members only for the input it was called with (see :class:`_SharedInput`).
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _lora_parts(module) -> tuple:
    """(weight, bias, lora_A, lora_B, scaling, dropout probability now) of a plain peft LoRA linear."""
    name = module.active_adapters[0]
    dropout = module.lora_dropout[name]
    p = dropout.p if isinstance(dropout, torch.nn.Dropout) and module.training else 0.0
    return (module.base_layer.weight, module.base_layer.bias, module.lora_A[name].weight,
            module.lora_B[name].weight, float(module.scaling[name]), p)


def _compute_dtype(module, x) -> torch.dtype:
    """The dtype the layer's matmuls run in: autocast's where it is on (ask before turning it off)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return module.base_layer.weight.dtype


class _SharedInput:
    """LoRA linears that read one input: the first called computes them all, the others take their output.

    An output is handed out only to a member called with the very tensor it was
    computed from; any other call recomputes the group on its own input.
    """

    def __init__(self, members: list):
        self.members = members
        self.input = None
        self.pending: dict[int, torch.Tensor] = {}

    def forward(self, module, x, *args, **kwargs):
        if x is self.input and id(module) in self.pending:
            return self.pending.pop(id(module))
        parts = [_lora_parts(m) for m in self.members]
        if any(p > 0.0 for *_, p in parts):  # dropout draws a mask per layer: layer by layer
            return _lora_linear(module, x)
        tensors = [t for w, bias, a, b, _, _ in parts for t in (w, bias, a, b)]
        compute_dtype = _compute_dtype(module, x)
        with torch.autocast(x.device.type, enabled=False):
            outputs = _LoraGroup.apply(x, tuple(s for *_, s, _ in parts), compute_dtype, *tensors)
        self.input = x
        self.pending = {id(m): out for m, out in zip(self.members, outputs) if m is not module}
        return outputs[self.members.index(module)]

    def clear(self) -> None:
        self.input, self.pending = None, {}


def _lora_linear(module, x):
    """One plain LoRA linear with dropout, through :class:`_LoraLinear`."""
    weight, bias, lora_a, lora_b, scaling, p = _lora_parts(module)
    compute_dtype = _compute_dtype(module, x)
    with torch.autocast(x.device.type, enabled=False):
        return _LoraLinear.apply(x, weight, bias, lora_a, lora_b, scaling, p, compute_dtype)


def _plain_lora_layers(model) -> list[tuple[str, object]]:
    """(name, layer) of the peft LoRA linears :func:`fused_lora` can take over: one plain adapter, unmerged."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return []
    layers = []
    for name, module in model.named_modules():
        if (isinstance(module, LoraLinear) and not module.disable_adapters and not module.merged
                and len(module.active_adapters) == 1 and module.active_adapters[0] in module.lora_A
                and module.active_adapters[0] not in module.lora_variant
                and isinstance(module.base_layer, torch.nn.Linear)
                and not module.base_layer.weight.requires_grad
                and module.lora_B[module.active_adapters[0]].bias is None):
            layers.append((name, module))
    return layers


def _shared_input_groups(layers: list[tuple[str, object]]) -> list[list]:
    """``layers`` grouped by :data:`SHARED_INPUT_GROUPS` within each parent module; the rest alone."""
    by_parent: dict[tuple[str, int], list] = {}
    groups = []
    for name, module in layers:
        parent, _, leaf = name.rpartition(".")
        kind = next((i for i, group in enumerate(SHARED_INPUT_GROUPS) if leaf in group), None)
        if kind is None:
            groups.append([module])
        else:
            by_parent.setdefault((parent, kind), []).append(module)
    for members in by_parent.values():
        features = {m.base_layer.in_features for m in members}
        groups += [members] if len(features) == 1 else [[m] for m in members]
    return groups


@contextlib.contextmanager
def fused_lora(model) -> Iterator[int]:
    """Within the block, plain LoRA layers of ``model`` run fused (:class:`_LoraGroup`); yields how many.

    The adapters' parameters are peft's own, so saving, loading and merging are
    untouched; DoRA and other variants, merged or disabled adapters keep peft's path.
    """
    layers = _plain_lora_layers(model)
    groups = [_SharedInput(members) for members in _shared_input_groups(layers)]
    for group in groups:
        for module in group.members:
            module.forward = functools.partial(group.forward, module)
    try:
        yield len(layers)
    finally:
        for group in groups:
            group.clear()
            for module in group.members:
                del module.forward


# --------------------------------------------------------------------------- RMSNorm


class _RMSNorm(torch.autograd.Function):
    """``x / rms(x) * (weight + offset)`` in fp32, with a hand-written backward.

    transformers writes RMSNorm as five tensor ops (cast, square, mean, rsqrt,
    two products), so autograd keeps their intermediates and runs their backward
    ops one by one: about 3.5 ms for one norm over 1,432 x 576 on this CPU, 61 norms
    a step in SmolLM2. One row-norm and two products forward, four passes backward
    do the same in 1.5 ms (bench/RESULTS.md). Same values to float rounding.
    """

    @staticmethod
    def forward(ctx, x, weight, eps: float, offset: float):
        rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).pow_(2).div_(x.shape[-1]).add_(eps).rsqrt_()
        w = weight + offset if offset else weight
        ctx.save_for_backward(x, rstd, w)
        return (x * rstd).mul_(w)

    @staticmethod
    def backward(ctx, grad):
        x, rstd, w = ctx.saved_tensors
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad * x).mul_(rstd).reshape(-1, x.shape[-1]).sum(0)
        gw = grad * w
        # d/dx of x * rstd: rstd * gw - x * rstd^3 * sum(gw * x) / d
        coef = torch.linalg.vecdot(gw, x).unsqueeze(-1).mul_(rstd.pow(3)).div_(-x.shape[-1])
        return gw.mul_(rstd).addcmul_(x, coef), grad_w, None, None


# transformers' RMSNorm classes: (the attribute holding epsilon, what is added to the weight).
RMS_NORMS = {"LlamaRMSNorm": ("variance_epsilon", 0.0), "MistralRMSNorm": ("variance_epsilon", 0.0),
             "Qwen2RMSNorm": ("variance_epsilon", 0.0), "Qwen3RMSNorm": ("variance_epsilon", 0.0),
             "GemmaRMSNorm": ("eps", 1.0), "Gemma2RMSNorm": ("eps", 1.0), "Gemma3RMSNorm": ("eps", 1.0)}


def _fused_norm_forward(module, eps: float, offset: float, original, x):
    if x.dtype != torch.float32 or module.weight.dtype != torch.float32:
        return original(x)  # transformers casts in its own way for other dtypes: keep its path
    return _RMSNorm.apply(x, module.weight, eps, offset)


@contextlib.contextmanager
def fused_rms_norm(model) -> Iterator[int]:
    """Within the block, the RMSNorm layers of ``model`` (classes in :data:`RMS_NORMS`) run :class:`_RMSNorm`."""
    norms = []
    for module in model.modules():
        known = RMS_NORMS.get(type(module).__name__)
        if known is not None and "forward" not in vars(module):
            attribute, offset = known
            original = module.forward
            module.forward = functools.partial(_fused_norm_forward, module, float(getattr(module, attribute)),
                                               offset, original)
            norms.append(module)
    try:
        yield len(norms)
    finally:
        for module in norms:
            del module.forward


# --------------------------------------------------------------------------- rotary embedding


def _rotate(x, cos, sin, dtype, sign: float) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` (``sign`` 1), or its transpose for the backward (``sign`` -1).

    Written half by half into one output: ``[x1 c1 - x2 s1, x2 c2 + x1 s2]``. Its
    transpose, the gradient, is ``[g1 c1 + g2 s2, g2 c2 - g1 s1]``.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c1, c2, s1, s2 = cos[..., :half], cos[..., half:], sin[..., :half], sin[..., half:]
    if sign < 0:
        s1, s2 = s2, s1
    out = torch.empty_like(x, dtype=dtype)
    first, second = out[..., :half], out[..., half:]
    torch.mul(x1, c1, out=first).addcmul_(x2, s1, value=-sign)
    torch.mul(x2, c2, out=second).addcmul_(x1, s2, value=sign)
    return out


class _Rotary(torch.autograd.Function):
    """Rotary embedding of queries and keys as one function: four passes each way instead of a dozen.

    transformers writes it ``q * cos + rotate_half(q) * sin``: a slice, a negation,
    a cat, two products and a sum, each a pass over the tensor with its own
    backward, for queries and for keys, in every layer. Same values to float
    rounding; cos and sin are constants (transformers computes them without grad).
    """

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        ctx.save_for_backward(cos, sin)
        ctx.dtypes = (q.dtype, k.dtype)
        return (_rotate(q, cos, sin, torch.result_type(q, cos), 1.0),
                _rotate(k, cos, sin, torch.result_type(k, cos), 1.0))

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        q_dtype, k_dtype = ctx.dtypes
        return _rotate(grad_q, cos, sin, q_dtype, -1.0), _rotate(grad_k, cos, sin, k_dtype, -1.0), None, None


# transformers modules whose ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)`` is the
# rotate-half form on the whole head (partial-rotary models such as Phi-3 are not listed).
ROTARY_MODULES = tuple(f"transformers.models.{name}.modeling_{name}"
                       for name in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3"))
_ROTARY_LOCK = threading.Lock()
_ROTARY_USERS: dict[str, list] = {}  # module name -> [transformers' own function, blocks inside]


def _fused_rotary_function(original):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if (unsqueeze_dim != 1 or cos.requires_grad or sin.requires_grad or q.shape[-1] % 2
                or cos.shape[-1] != q.shape[-1]):
            return original(q, k, cos, sin, unsqueeze_dim)
        return _Rotary.apply(q, k, cos, sin)

    return apply_rotary_pos_emb


@contextlib.contextmanager
def fused_rotary(model) -> Iterator[int]:
    """Within the block, the rotary embedding of ``model``'s architecture runs :class:`_Rotary`; yields 1 or 0.

    transformers calls the module-level ``apply_rotary_pos_emb`` of the model's
    modeling file, so that is what is replaced, for the block's duration (blocks
    may nest or run in several threads: the first in installs, the last out restores).
    """
    names = {type(m).__module__ for m in model.modules()} & set(ROTARY_MODULES)
    modules = [sys.modules[name] for name in sorted(names)]
    with _ROTARY_LOCK:
        for module in modules:
            users = _ROTARY_USERS.setdefault(module.__name__, [module.apply_rotary_pos_emb, 0])
            if users[1] == 0:
                module.apply_rotary_pos_emb = _fused_rotary_function(users[0])
            users[1] += 1
    try:
        yield len(modules)
    finally:
        with _ROTARY_LOCK:
            for module in modules:
                users = _ROTARY_USERS[module.__name__]
                users[1] -= 1
                if users[1] == 0:
                    module.apply_rotary_pos_emb = users[0]
                    del _ROTARY_USERS[module.__name__]


# --------------------------------------------------------------------------- loss


class _LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets``, in chunks of rows.

    The gradients are computed during the forward pass, chunk by chunk, so the
    ``[rows, vocab]`` logits and their softmax never exist whole (Liger's fused
    linear cross-entropy, written with plain torch ops); the backward only scales
    them. On a CPU the ``rows x vocab`` passes are memory-bound, so there are as
    few as can be: the softmax is made in the logits' buffer, the maximum and its
    index come from one pass, and the softmax's row sums and the one-hot of the
    targets are folded into the products (``(E/s - 1_y) W = (E W)/s - W_y``)
    instead of two more passes. Inside :func:`reused_loss_buffers` the buffers
    are reused from chunk to chunk and step to step: a fresh 100 MB tensor costs
    the kernel a page fault per 4 KB on first touch (about 100 ms a step here).
    A frozen weight on the CPU (LoRA) takes vocabulary slices instead
    (:func:`_frozen_weight_pass`).
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int, vocab_chunk: int, softcap: float | None,
                compute_dtype):
        weight_c = cast_weight(weight, compute_dtype)
        need_hidden, need_weight = hidden.requires_grad, weight.requires_grad
        ctx.dtypes = (hidden.dtype, weight.dtype)
        if not need_weight and hidden.device.type == "cpu":
            total, correct, grad_hidden = _frozen_weight_pass(hidden, weight, weight_c, targets, vocab_chunk,
                                                              softcap, need_hidden)
            ctx.save_for_backward(grad_hidden, None)
            ctx.mark_non_differentiable(correct)
            return total, correct
        grad_hidden = torch.empty_like(hidden, dtype=torch.float32) if need_hidden else None
        grad_weight = None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            h = hidden[rows].to(compute_dtype)
            y = targets[rows, None]
            logits = _chunk_logits(h, weight_c)
            if softcap is not None:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            picked = logits.gather(1, y)
            top, best = logits.max(dim=-1, keepdim=True)
            correct += (best == y).sum()
            exps = logits.sub_(top).exp_()  # the softmax's numerators, in place
            sums = exps.sum(dim=-1, keepdim=True)
            total += (sums.log() + top - picked).sum()
            if not (need_hidden or need_weight):
                continue
            if softcap is not None:  # d/d logits = (softmax - onehot) * tanh's derivative: no folding
                grad_logits = exps.div_(sums)
                grad_logits.scatter_add_(1, y, torch.full_like(y, -1.0, dtype=grad_logits.dtype))
                grad_logits *= 1.0 - capped * capped
                grad_logits, inverse = grad_logits.to(compute_dtype), None
            else:
                grad_logits, inverse = _in_compute_dtype(exps, compute_dtype), sums.reciprocal()
            if need_hidden:
                grad_hidden[rows] = _grad_of_hidden(grad_logits, inverse, weight, weight_c, y)
            if need_weight:
                grad_weight = _add_grad_of_weight(grad_weight, grad_logits, inverse, hidden[rows], h, y)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(correct)
        return total, correct

    @staticmethod
    def backward(ctx, grad_total, _grad_correct):
        # The saved gradients are scaled in place: the output layer's is vocab x d (113 MB in
        # SmolLM2), and a scaled copy of it costs a fresh allocation and a pass over it every step.
        if getattr(ctx, "consumed", False):
            raise RuntimeError("linear_cross_entropy's backward can run only once (retain_graph is not supported)")
        ctx.consumed = True
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        gh = None if grad_hidden is None else grad_hidden.mul_(grad_total).to(hidden_dtype)
        gw = None if grad_weight is None else grad_weight.mul_(grad_total).to(weight_dtype)
        return gh, gw, None, None, None, None, None


def _frozen_weight_pass(hidden, weight, weight_c, targets, vocab_chunk: int, softcap: float | None,
                        need_hidden: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(summed loss, correct count, d loss / d hidden) for a weight that does not train, by vocabulary slices.

    With the weight frozen (LoRA), only the hidden states' gradient is needed,
    ``(E W)/s - W_y``, and it can be summed slice by slice of the vocabulary
    with an online softmax: the running maximum rescales the running sum and
    the running product when it moves (as flash attention does over keys). A
    slice's ``rows x vocab_chunk`` logits stay in the CPU's cache between the
    matmul that makes them, the passes that exponentiate them and the matmul
    that reads them back, instead of making the round trip through memory that a
    chunk of rows over the whole vocabulary makes (75 MB for 380 rows of
    SmolLM2's 49k vocabulary), and the slice's matmuls run at the machine's
    matmul rate where the ``rows x vocab`` product did not. In fp32 the loss
    and its gradient took 2% less time for 380 rows of SmolLM2, 7% for 1,200,
    and 28% on Gemma 3's 262k vocabulary; the LoRA step ran 1.0% and 16% faster
    (bench/RESULTS_EPYC.md). A weight that trains needs every row of its
    gradient scaled by the final sum, so it keeps the row chunks.
    """
    h = hidden.to(weight_c.dtype)
    top = sums = best = scaled = None
    for start in range(0, weight_c.shape[0], vocab_chunk):
        w = weight_c[start:start + vocab_chunk]
        logits = _chunk_logits(h, w)
        if softcap is not None:
            tanh = logits.div_(softcap).tanh_()
            logits = torch.mul(tanh, softcap, out=_scratch("capped", logits.shape, torch.float32, logits.device))
        chunk_top, chunk_best = logits.max(dim=-1)
        if top is None:
            top, best, alpha = chunk_top, chunk_best, None
        else:
            best = torch.where(chunk_top > top, chunk_best + start, best)  # the first maximum, as argmax
            new_top = torch.maximum(top, chunk_top)
            alpha = (top - new_top).exp_()
            top = new_top
        exps = logits.sub_(top[:, None]).exp_()
        chunk_sums = exps.sum(dim=-1)
        sums = chunk_sums if alpha is None else sums.mul_(alpha).add_(chunk_sums)
        if not need_hidden:
            continue
        if softcap is not None:
            exps.mul_(tanh.mul_(tanh).neg_().add_(1.0))  # the cap's derivative, 1 - tanh^2
        scaled = _add_slice_product(scaled, alpha, exps, w)
    weight_y = weight.index_select(0, targets).float()
    picked = torch.linalg.vecdot(hidden.float(), weight_y)  # the targets' logits
    if softcap is not None:
        tanh_y = torch.tanh(picked / softcap)
        picked, weight_y = tanh_y * softcap, weight_y * (1.0 - tanh_y * tanh_y)[:, None]
    total = (sums.log() + top - picked).sum()
    correct = (best == targets).sum()
    grad_hidden = scaled.div_(sums[:, None]).sub_(weight_y) if need_hidden else None
    return total, correct, grad_hidden


def _add_slice_product(scaled: torch.Tensor | None, alpha: torch.Tensor | None, exps: torch.Tensor,
                       w: torch.Tensor) -> torch.Tensor:
    """``scaled * alpha + exps @ w`` in fp32 (``exps @ w`` for the first slice), in place where it can be."""
    if scaled is None:
        return (_in_compute_dtype(exps, w.dtype) @ w).float()
    scaled.mul_(alpha[:, None])
    if w.dtype == torch.float32:
        return scaled.addmm_(exps, w)
    return scaled.add_(_in_compute_dtype(exps, w.dtype) @ w)


def _chunk_logits(h: torch.Tensor, weight_c: torch.Tensor) -> torch.Tensor:
    """``h @ weight_c.T`` in fp32, in reusable buffers (the product runs in ``h``'s dtype).

    A row chunk's logits over the whole vocabulary, or all rows' over a slice of it
    (:func:`_frozen_weight_pass`): one loss takes one of the two, so they share the buffers.
    """
    shape = (h.shape[0], weight_c.shape[0])
    if h.dtype == torch.float32:
        return torch.mm(h, weight_c.T, out=_scratch("logits", shape, torch.float32, h.device))
    product = torch.mm(h, weight_c.T, out=_scratch("logits_c", shape, h.dtype, h.device))
    return _scratch("logits", shape, torch.float32, h.device).copy_(product)


def _in_compute_dtype(exps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The softmax numerators as the products' operand: themselves in fp32, a reused copy otherwise."""
    if exps.dtype == dtype:
        return exps
    return _scratch("logits_c", exps.shape, dtype, exps.device).copy_(exps)


def _grad_of_hidden(grad_logits, inverse, weight, weight_c, y) -> torch.Tensor:
    """d loss / d hidden for a chunk: ``grad_logits @ W``; with ``inverse``, ``(E @ W) / s - W_y`` (fp32)."""
    product = (grad_logits @ weight_c).float()
    if inverse is None:
        return product
    return product.mul_(inverse).sub_(weight.index_select(0, y[:, 0]).float())


def _add_grad_of_weight(grad_weight, grad_logits, inverse, hidden, h, y) -> torch.Tensor:
    """Adds a chunk's d loss / d weight: ``grad_logits.T @ h``; with ``inverse``, ``E.T @ (h / s) - onehot.T @ h``.

    The first chunk's product is the buffer (no zero fill of vocab x d).
    """
    if inverse is not None:
        hidden = hidden.float()
        h = (hidden * inverse).to(h.dtype)
    if grad_weight is None:
        grad_weight = (grad_logits.T @ h).float()
    elif h.dtype == torch.float32:
        grad_weight.addmm_(grad_logits.T, h)
    else:
        grad_weight += grad_logits.T @ h
    if inverse is not None:
        grad_weight.index_add_(0, y[:, 0], hidden, alpha=-1.0)
    return grad_weight


class _Buffers:
    """Flat buffers handed out as views of the asked shape, grown when too small."""

    def __init__(self):
        self.flat: dict[tuple, torch.Tensor] = {}

    def view(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        numel = shape[0] * shape[1]
        key = (name, dtype, str(device))
        flat = self.flat.get(key)
        if flat is None or flat.numel() < numel:
            flat = self.flat[key] = torch.empty(numel, dtype=dtype, device=device)
        return flat[:numel].view(shape)


_LOSS_BUFFERS = threading.local()


@contextlib.contextmanager
def reused_loss_buffers() -> Iterator[None]:
    """While the block runs, :func:`linear_cross_entropy` reuses its ``rows x vocab`` buffers (this thread's)."""
    previous = getattr(_LOSS_BUFFERS, "current", None)
    _LOSS_BUFFERS.current = _Buffers()
    try:
        yield
    finally:
        _LOSS_BUFFERS.current = previous


def _scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """A buffer for a temporary of the loss: reused inside :func:`reused_loss_buffers`, fresh outside."""
    buffers = getattr(_LOSS_BUFFERS, "current", None)
    if buffers is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return buffers.view(name, shape, dtype, device)


# Vocabulary slice of the frozen-weight loss on the CPU (:func:`_frozen_weight_pass`), by the products'
# dtype: in fp32, 512 was the fastest for 380 rows of SmolLM2 and of Gemma 3 (1,024-2,048 alike for 1,200
# rows); bf16 products run about twice as fast, and wider slices spread the per-slice passes (2,048).
LOSS_VOCAB_CHUNK_FP32 = 512
LOSS_VOCAB_CHUNK_REDUCED = 2048  # bf16 / fp16 products


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         chunk_rows: int | None = None, vocab_chunk: int | None = None,
                         softcap: float | None = None) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy of the logits ``hidden @ weight.T`` (rows x vocab), never all materialised.

    Args:
        hidden: ``[rows, d]`` hidden states at the labelled positions.
        weight: ``[vocab, d]`` output-layer weight (tied embeddings included).
        targets: ``[rows]`` token ids, none ignored.
        chunk_rows: rows per chunk (memory is ``chunk_rows x vocab`` floats); default: 128 MiB of logits.
        vocab_chunk: vocabulary slice of a frozen weight on the CPU, which takes the slices in place of
            the row chunks (:func:`_frozen_weight_pass`; memory is ``rows x vocab_chunk`` floats);
            default: by the products' dtype (:data:`LOSS_VOCAB_CHUNK_FP32`, :data:`LOSS_VOCAB_CHUNK_REDUCED`).
        softcap: final logit soft-capping (``tanh(x/c)*c``), as some Gemma models use.

    Returns:
        (the summed loss, a differentiable fp32 scalar; how many rows the argmax gets right).
        Under CPU/CUDA autocast the matmuls run in the autocast dtype, the softmax in fp32.
    """
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0, 0  # keeps the graph: no labelled token in this batch
    if not torch.is_grad_enabled():  # validation: a weight that trains needs no gradient here
        hidden, weight = hidden.detach(), weight.detach()
    if chunk_rows is None:
        chunk_rows = max(64, (128 << 20) // (4 * weight.shape[0]))
    compute_dtype = weight.dtype
    if torch.is_autocast_enabled(hidden.device.type):
        compute_dtype = torch.get_autocast_dtype(hidden.device.type)
    if vocab_chunk is None:
        vocab_chunk = LOSS_VOCAB_CHUNK_FP32 if compute_dtype == torch.float32 else LOSS_VOCAB_CHUNK_REDUCED
    with torch.autocast(hidden.device.type, enabled=False):
        total, correct = _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, vocab_chunk, softcap,
                                                   compute_dtype)
    return total, int(correct)


@contextlib.contextmanager
def last_mlp_on_rows(model, rows: torch.Tensor) -> Iterator[bool]:
    """Within the block, the last decoder layer's MLP of ``model`` runs only at ``rows`` of a packed row.

    Only the final hidden states at the labelled positions reach the loss, and an
    MLP works row by row, so the last layer's MLP at every other row is thrown
    away: about 70% of the rows of a chat, whose prompt carries no label. Its
    output is zero there (so are the layer's final hidden states' MLP parts, which
    nothing reads); at ``rows`` it is the MLP's own, and so are its gradients.
    Yields whether the model has such a layer (``model.get_decoder().layers[-1].mlp``).
    """
    layers = getattr(model.get_decoder(), "layers", None)
    mlp = getattr(layers[-1], "mlp", None) if layers is not None and len(layers) else None
    if mlp is None or "forward" in vars(mlp):
        yield False
        return
    original = mlp.forward

    def forward(x, *args, **kwargs):
        if x.dim() != 3 or x.shape[0] != 1:
            return original(x, *args, **kwargs)
        picked = original(x[0].index_select(0, rows).unsqueeze(0), *args, **kwargs)
        return picked.new_zeros(*x.shape[:2], picked.shape[-1]).index_copy(1, rows, picked)

    mlp.forward = forward
    try:
        yield True
    finally:
        del mlp.forward


def packed_token_loss(model, batch: PackedBatch, *, chunk_rows: int | None = None) -> tuple[torch.Tensor, int]:
    """Summed next-token loss over the labelled tokens of ``batch``, and how many the model got right.

    The decoder runs once over the packed row; the output layer only on the
    labelled rows. Works for a transformers causal LM or a PEFT model wrapping
    one; attention runs per example (:func:`packed_attention`), plain LoRA
    layers fused (:func:`fused_lora`), RMSNorm and the rotary embedding with their
    own backwards (:func:`fused_rms_norm`, :func:`fused_rotary`) for the duration of the call.

    Returns:
        (summed loss, correct count), as the padded path's ``token_loss`` gives them.
    """
    decoder = model.get_decoder()
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        raise ValueError("an output layer with a bias is not supported by the packed loss")
    bounds = batch.cu_seqlens
    rows = (batch.targets[0] != IGNORE_INDEX).nonzero().squeeze(1)
    with (packed_attention(model), fused_lora(model), fused_rms_norm(model), fused_rotary(model),
          last_mlp_on_rows(model, rows)):
        hidden = decoder(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False,
                         cu_seq_lens_q=bounds, cu_seq_lens_k=bounds,
                         max_length_q=batch.max_seqlen, max_length_k=batch.max_seqlen).last_hidden_state
    config = model.config
    softcap = getattr(getattr(config, "text_config", config), "final_logit_softcapping", None)
    return linear_cross_entropy(hidden[0].index_select(0, rows), head.weight, batch.targets[0, rows],
                                chunk_rows=chunk_rows, softcap=softcap)
