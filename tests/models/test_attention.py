"""Which attention kernels run: cuDNN's are left out on CUDA, nothing changes elsewhere."""

import torch

from tunesmith.models.attention import attention_kernels


def _enabled() -> dict[str, bool]:
    backends = torch.backends.cuda
    return {"cudnn": backends.cudnn_sdp_enabled(), "flash": backends.flash_sdp_enabled(),
            "efficient": backends.mem_efficient_sdp_enabled(), "math": backends.math_sdp_enabled()}


def test_attention_on_cuda_leaves_out_cudnn_and_restores_the_choice_after():
    before = _enabled()
    with attention_kernels("cuda:0"):
        inside = _enabled()
    assert inside == {"cudnn": False, "flash": True, "efficient": True, "math": True}
    assert _enabled() == before


def test_attention_on_the_cpu_is_left_as_pytorch_chooses():
    before = _enabled()
    with attention_kernels(torch.device("cpu")):
        assert _enabled() == before
        q = torch.randn(1, 2, 5, 8)
        out = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert torch.allclose(out, torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True))
