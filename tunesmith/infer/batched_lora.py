"""LoRA applied per row as one batched matmul, so one forward pass can mix adapters.

peft can mix adapters in a batch (``adapter_names``), but it splits the batch by
adapter inside every LoRA layer: with eight adapters that is eight small matmuls
per layer instead of one, which on a CPU costs 30-50% of the throughput. Here,
as in punica/LoRAX (SGMV), the adapters' weights of each layer are stacked once
into ``A: [slots, in, r_max]`` and ``B: [slots, r_max, out]`` (slot 0 is zeros:
the plain base; smaller ranks are padded with zeros; the scaling is folded into
B), and each row's delta is ``bmm(bmm(x, A[slot]), B[slot])`` gathered by the
row's slot: the same ops per layer for one adapter or eight. A decode step
reads the stacked weights in place instead, when that reads less than a gather
copies: ``x @ A_span`` over the slots from the lowest to the highest one its rows
use (side by side in the stack, so a view), zeroed outside each row's own slot,
``@ B_span`` (two matmuls, no copies; 40% less time per layer than the gather for
8 rows and 8 adapters). A decode step costs about what it reads, so only the used span
is read: 8 rows of one adapter read that adapter's weights alone, not all eight.

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
        self._rows: torch.Tensor | None = None
        self._span: tuple[int, int] = (0, 0)
        self._one_slot = False  # every row uses the same adapter: nothing to mask
        self._masks: dict[int, torch.Tensor] = {}

    def rebuild(self, model: torch.nn.Module) -> None:
        """Restack every attached adapter's weights (after one was attached or removed).

        Args:
            model: the peft model (or a plain model, which has nothing to stack).
        """
        for layer in self._routed:
            del layer.forward
        self._routed, self.slots, self._tuner_layers = [], {}, []
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

    @contextlib.contextmanager
    def rows(self, adapters: list[str | None], device: torch.device) -> Iterator[None]:
        """Within: the forward pass applies each row's adapter (None: the base)."""
        slots = [0 if name is None else self.slots[name] for name in adapters]
        used = [slot for slot in slots if slot]
        self._rows = torch.tensor(slots, dtype=torch.long, device=device) if used else None
        self._span = (min(used), max(used) + 1) if used else (0, 0)
        self._one_slot = len(used) == len(slots) and len(set(used)) == 1
        self._masks = {}
        try:
            yield
        finally:
            self._rows, self._span, self._one_slot, self._masks = None, (0, 0), False, {}

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
        """The layer's ``A: [in, slots, r_max]`` and ``B: [slots, r_max, out]`` (scaled; slot 0 and padding zero)."""
        base = layer.get_base_layer()
        held = [n for n in names if n in layer.lora_A]
        rank = max(layer.lora_A[n].weight.shape[0] for n in held)
        weight = base.weight
        a = torch.zeros(base.in_features, len(names) + 1, rank, dtype=weight.dtype, device=weight.device)
        b = torch.zeros(len(names) + 1, rank, base.out_features, dtype=weight.dtype, device=weight.device)
        for name in held:
            slot, r = self.slots[name], layer.lora_A[name].weight.shape[0]
            a[:, slot, :r] = layer.lora_A[name].weight.detach().T
            b[slot, :r, :] = layer.lora_B[name].weight.detach().T * layer.scaling[name]
        return a, b

    def _span_mask(self, rows: torch.Tensor, rank: int, dtype: torch.dtype) -> torch.Tensor | None:
        """[rows, span * rank]: ones over each row's own slot within the span; None when all rows share one."""
        if self._one_slot:
            return None
        mask = self._masks.get(rank)
        if mask is None:
            low, high = self._span
            # one block more than the span: base rows (slot 0) mark it, and it is cut off
            mask = torch.zeros(rows.shape[0], high - low + 1, rank, dtype=dtype, device=rows.device)
            mask[torch.arange(rows.shape[0], device=rows.device), torch.where(rows > 0, rows - low, -1)] = 1
            mask = self._masks[rank] = mask[:, :-1].reshape(rows.shape[0], (high - low) * rank)
        return mask

    def _add_adapters(self, a: torch.Tensor, b: torch.Tensor):
        """``add_adapters(x, output)``: a layer's base ``output`` on ``x`` plus each row's delta from the stacks."""
        size_in, slots, rank = a.shape
        a_all, b_all = a.reshape(size_in, slots * rank), b.reshape(slots * rank, -1)

        def add_adapters(x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
            rows = self._rows
            if rows is None:
                return output
            flat = x.reshape(x.shape[0], -1, x.shape[-1]).to(a.dtype)
            out = output.view(flat.shape[0], flat.shape[1], -1)
            low, high = self._span
            # a gather writes, then reads again, rows x rank x (in + out) weights; the span is read once
            if flat.shape[1] == 1 and high - low <= 3 * rows.shape[0]:
                down = flat[:, 0] @ a_all[:, low * rank:high * rank]
                mask = self._span_mask(rows, rank, a.dtype)
                if mask is not None:
                    down.mul_(mask)
                out[:, 0].addmm_(down, b_all[low * rank:high * rank])
                return output
            down = torch.bmm(flat, a.index_select(1, rows).transpose(0, 1))
            return torch.baddbmm(out, down, b.index_select(0, rows)).view_as(output)

        return add_adapters


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
