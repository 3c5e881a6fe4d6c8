"""Which of PyTorch's attention kernels the model runs on CUDA.

PyTorch's ``scaled_dot_product_attention`` prefers cuDNN's kernels on Hopper GPUs
(H100, H200). cuDNN builds an execution plan for every new shape, about 5 ms of CPU
time a call, and tunesmith's calls are nearly all new shapes: packed training calls
attention once per example, each with its own length, and decoding calls it with a
key one token longer at every step. Profiled on an H200 (Gemma 3 270M, LoRA, bf16,
batches of 4, 10 steps): cuDNN's forward and backward took 6.8 s of CPU time of the
8 s the steps took, while all the GPU's kernels together ran 0.26 s. PyTorch's own
FlashAttention-2 and memory-efficient kernels need no per-shape plan.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

# In PyTorch's order of preference; cuDNN left out (see the module's docstring).
CUDA_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention_kernels(device: torch.device | str) -> contextlib.AbstractContextManager:
    """A context in which attention on ``device`` avoids cuDNN (CUDA); elsewhere nothing changes."""
    if torch.device(device).type == "cuda":
        return sdpa_kernel(CUDA_ATTENTION_BACKENDS)
    return contextlib.nullcontext()
