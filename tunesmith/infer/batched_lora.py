"""LoRA applied per row as one batched matmul, so one forward pass can mix adapters.

peft can mix adapters in a batch (``adapter_names``), but it splits the batch by
adapter inside every LoRA layer: with eight adapters that is eight small matmuls
per layer instead of one, which on a CPU costs 30-50% of the throughput. Here,
as in punica/LoRAX (SGMV), the adapters' weights of each layer are stacked once
into ``A: [slots, in, r_max]`` and ``B: [slots, r_max, out]`` (slot 0 is zeros:
the plain base; smaller ranks are padded with zeros; the scaling is folded into
B). A forward pass lines its rows up by adapter, one group per slot (padded with
zero rows to the largest group), and computes every row's delta in two ``bmm``
calls, ``bmm(bmm(x_groups, A[slots]), B[slots])``: the same ops per layer for one
adapter or eight, each adapter's weights read once, by the rows that use it.
The slots are a view of the stacks when the used ones lie close together (a copy
only when they are scattered), and the rows need no reordering when they already
come grouped (8 rows of one adapter). On the CPU measured, this reads 8 adapters'
weights at about 20 GB/s, against 7 GB/s for one matmul of all rows by all the
used slots side by side (masked to each row's own): a ``bmm`` of one row per
adapter runs a matrix-vector product per thread, while a matmul of 8 rows by a
narrow matrix runs BLAS's small-matrix path.

peft's own layers stay attached with their adapters disabled; each plain LoRA
layer's forward is replaced by one that runs its base layer and adds the batched
delta (peft's own forward runs only in a peft lane). Adapters this cannot express
(DoRA and other peft LoRA variants, ``modules_to_save``, LoRA on embeddings,
bias) are left out of the stacks: the engine runs them through peft itself
(``peft_adapter``), each in batches of its own.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


class BatchedLora:
    """The stacked weights of a base model's plain LoRA adapters and the layer forwards that apply them.

    Not thread-safe by itself: the engine calls it under the base model's lock.
    """

    def __init__(self) -> None:
        self.slots: dict[str, int] = {}
        self._routed: list = []
        self._peft_lane = False
        self._tuner_layers: list = []
        self._groups: _Groups | None = None  # the rows of the forward pass in flight, by adapter
        self._last_groups: tuple = (None, None)  # ((slots, device), groups) of the last forward pass

    def rebuild(self, model: torch.nn.Module) -> None:
        """Restack every attached adapter's weights (after one was attached or removed).

        Args:
            model: the peft model (or a plain model, which has nothing to stack).
        """
        for layer in self._routed:
            del layer.forward
        self._routed, self.slots, self._tuner_layers, self._last_groups = [], {}, [], (None, None)
        configs = getattr(model, "peft_config", None)
        if not configs:
            return
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.tuners_utils import BaseTunerLayer

        self._tuner_layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        plain = [name for name in configs if _is_plain_lora(name, configs[name], self._tuner_layers, LoraLinear)]
        self.slots = {name: slot for slot, name in enumerate(plain, start=1)}
        for layer in self._tuner_layers:
            layer.enable_adapters(False)  # peft computes the base; our forwards add the adapters
            if isinstance(layer, LoraLinear) and any(name in layer.lora_A for name in plain):
                a, b = self._stack(layer, plain)
                layer.forward = self._forward(layer, self._add_adapters(a, b))
                self._routed.append(layer)

    def supports(self, adapter: str | None) -> bool:
        """Whether rows of ``adapter`` (None: the base) can run in the mixed batch."""
        return adapter is None or adapter in self.slots

    def row_order(self, adapter: str | None) -> int:
        """Where rows of ``adapter`` best sit in a batch: by slot, base rows last (then no layer reorders them)."""
        return len(self.slots) + 1 if adapter is None else self.slots.get(adapter, 0)

    @contextlib.contextmanager
    def rows(self, adapters: list[str | None], device: torch.device) -> Iterator[None]:
        """Within: the forward pass applies each row's adapter (None: the base)."""
        slots = tuple(0 if name is None else self.slots[name] for name in adapters)
        if self._last_groups[0] != (slots, device):  # a batch keeps its rows for many steps: reuse the grouping
            self._last_groups = ((slots, device), _Groups.of(list(slots), device))
        self._groups = self._last_groups[1]
        try:
            yield
        finally:
            self._groups = None

    @contextlib.contextmanager
    def peft_adapter(self, model: torch.nn.Module, adapter: str) -> Iterator[None]:
        """Within: peft itself applies ``adapter`` to every row (variants the stacks cannot express)."""
        model.set_adapter(adapter)
        for layer in self._tuner_layers:
            layer.enable_adapters(True)
        self._peft_lane = True
        try:
            yield
        finally:
            self._peft_lane = False
            for layer in self._tuner_layers:
                layer.enable_adapters(False)

    def _forward(self, layer, add_adapters):
        """``layer``'s forward: its base layer, then the batched adapters (peft's own forward in a peft lane).

        peft's forward with its adapters disabled, and a forward hook on top, cost
        2-6% of a decode step in Python (measured side by side) for no work.
        """

        def forward(x, *args, **kwargs):
            if self._peft_lane:
                return type(layer).forward(layer, x, *args, **kwargs)
            output = layer.base_layer(x, *args, **kwargs)
            return add_adapters(x, output)

        return forward

    def _stack(self, layer, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's ``A: [slots, in, r_max]`` and ``B: [slots, r_max, out]`` (scaled; slot 0 and padding zero)."""
        base = layer.get_base_layer()
        held = [n for n in names if n in layer.lora_A]
        rank = max(layer.lora_A[n].weight.shape[0] for n in held)
        weight = base.weight
        a = torch.zeros(len(names) + 1, base.in_features, rank, dtype=weight.dtype, device=weight.device)
        b = torch.zeros(len(names) + 1, rank, base.out_features, dtype=weight.dtype, device=weight.device)
        for name in held:
            slot, r = self.slots[name], layer.lora_A[name].weight.shape[0]
            a[slot, :, :r] = layer.lora_A[name].weight.detach().T
            b[slot, :r, :] = layer.lora_B[name].weight.detach().T * layer.scaling[name]
        return a, b

    def _add_adapters(self, a: torch.Tensor, b: torch.Tensor):
        """``add_adapters(x, output)``: a layer's base ``output`` on ``x`` plus each row's delta from the stacks.

        A decode step of one row spends more on the ops around its two small ``bmm`` than on
        them (about 1 us each, 210 layers): the slots' stacks are selected once per grouping,
        and the reshapes are skipped where the tensors already have their shapes.
        """
        selected: list = [None, None, None]  # the grouping last seen, and its slots of A and B

        def add_adapters(x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
            groups = self._groups
            if groups is None:
                return output
            if selected[0] is not groups:
                selected[:] = groups, groups.select(a), groups.select(b)
            _, a_used, b_used = selected
            flat = x if x.dim() == 3 and x.is_contiguous() else x.reshape(x.shape[0], -1, x.shape[-1]).contiguous()
            flat = flat if flat.dtype == a.dtype else flat.to(a.dtype)  # [rows, tokens, in]
            rows, tokens, size_in = flat.shape
            out = output if output.dim() == 3 else output.view(rows, tokens, -1)
            if groups.take is None:  # lined up already: the leading rows (base rows follow)
                if groups.lined < rows:
                    flat, out = flat[:groups.lined], out[:groups.lined]
                if groups.size > 1:  # one group's rows side by side: [groups, size * tokens, ...]
                    flat, out = _by_group(flat, groups.size), _by_group(out, groups.size)
                out.baddbmm_(torch.bmm(flat, a_used), b_used)
                return output
            # line the rows up by adapter; padding takes the zero row after the last
            flat = torch.cat([flat, flat.new_zeros(1, tokens, size_in)]).index_select(0, groups.take)
            down = torch.bmm(_by_group(flat, groups.size), a_used)
            delta = torch.bmm(down, b_used).view(-1, tokens, out.shape[-1])
            out.index_add_(0, groups.put, delta)  # padding rows add their zero delta to row 0
            return output

        return add_adapters


def _by_group(rows: torch.Tensor, size: int) -> torch.Tensor:
    """``[rows, tokens, features]`` as ``[rows / size, size * tokens, features]``: each group's rows side by side.

    A view (``rows`` must be contiguous): an output written through it lands in ``rows``.
    """
    return rows.view(-1, size * rows.shape[1], rows.shape[2])


class _Groups:
    """A forward pass's rows lined up by adapter: one group of ``size`` rows per slot, in slot order.

    ``take`` (None: the first ``lined`` rows as they come) lists the row of each place in the groups,
    ``len(rows)`` for padding (a zero row); ``put`` is where each place's delta goes
    (padding adds its zero delta to row 0). Base rows (slot 0) are in no group.
    """

    # view the stacks over the span of used slots while it holds at most this many times the used ones, else
    # copy the used slots: on SmolLM2's shapes the copy wins from a span of about 2.5 times the used slots
    SPAN_READ = 2

    def __init__(self, slots: list[int], used: list[int], device: torch.device) -> None:
        low, high = used[0], used[-1] + 1
        scattered = high - low > self.SPAN_READ * len(used)
        groups = used if scattered else list(range(low, high))  # a viewed span's unused slots get padding only
        members = {slot: [row for row, s in enumerate(slots) if s == slot] for slot in groups}
        self.size = max(len(rows) for rows in members.values())
        places = [rows + [len(slots)] * (self.size - len(rows)) for rows in members.values()]
        take = [row for rows in places for row in rows]
        self._view = None if scattered else slice(low, high)
        self._index = torch.tensor(used, dtype=torch.long, device=device) if scattered else None
        self.lined = len(take)
        self.take = None if take == list(range(len(take))) else torch.tensor(take, dtype=torch.long, device=device)
        self.put = None if self.take is None else torch.where(self.take < len(slots), self.take, 0)

    @classmethod
    def of(cls, slots: list[int], device: torch.device) -> "_Groups | None":
        """The groups of rows with these slots (0: the base); None when no row has an adapter."""
        used = sorted({slot for slot in slots if slot})
        return cls(slots, used, device) if used else None

    def select(self, stack: torch.Tensor) -> torch.Tensor:
        """The groups' slots of a layer's stack: a view over the span, or a copy of the scattered used slots."""
        return stack[self._view] if self._view is not None else stack.index_select(0, self._index)


def _is_plain_lora(name: str, config, tuner_layers: list, lora_linear: type) -> bool:
    """An adapter the stacks express exactly: LoRA on Linear layers only, no variant, no extra trained modules."""
    if str(getattr(config, "peft_type", "")).split(".")[-1] != "LORA":
        return False
    if getattr(config, "use_dora", False) or getattr(config, "modules_to_save", None) \
            or getattr(config, "lora_bias", False) or getattr(config, "trainable_token_indices", None) \
            or getattr(config, "fan_in_fan_out", False):
        return False
    for layer in tuner_layers:
        holds = any(name in getattr(layer, attr, {})
                    for attr in ("lora_A", "lora_embedding_A", "lora_magnitude_vector"))
        if not holds:
            continue
        if not isinstance(layer, lora_linear) or not isinstance(layer.get_base_layer(), torch.nn.Linear):
            return False
        if name in getattr(layer, "lora_variant", {}) or name not in layer.lora_A:
            return False
    return True
