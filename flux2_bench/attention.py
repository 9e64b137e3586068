"""Joint attention for FLUX.2: RoPE on Q and K, then one attention kernel, chosen by a switch.

`attention(q, k, v, pe)` takes (B, H, L, D) tensors after QK-norm and returns (B, L, H*D).
Backends:
- "sdpa" (default): torch's scaled_dot_product_attention with the fastest backend first
  (cuDNN, then flash, then memory-efficient, then math). On an H100 at FLUX.2-dev 1024²
  (B=1, H=48, L=4608, D=128) cuDNN measured 607 TFLOP/s against flash's 314 (reference/method.md),
  while torch's own default order puts flash first.
- "fp8": the FP8 flash-attention kernel (kernels/fp8_attention.py; on Hopper its main loop is the
  warp-specialized Gluon kernel of kernels/fp8_attention_sm90.py).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = ("sdpa", "fp8")
_SDPA_ORDER = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]
_backend = "sdpa"


def get_backend() -> str:
    return _backend


def set_backend(name: str) -> None:
    """Select the attention kernel for every FLUX.2 attention call in this process."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; valid: {', '.join(BACKENDS)}")
    _backend = name


@contextlib.contextmanager
def use_backend(name: str):
    """Temporarily select an attention backend: `with use_backend("fp8"): model(...)`."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def apply_rope(xq: Tensor, xk: Tensor, freqs_cis: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate adjacent pairs (2j, 2j+1) of Q and K in fp32 by the (..., D/2, 2, 2) tables of EmbedND.

    (x0 + i x1)(cos + i sin) is the spec's rotation; as a complex product it costs three passes over
    Q (upcast, multiply, downcast) instead of seven for the matrix form.
    """
    rot = torch.complex(freqs_cis[..., 0, 0], freqs_cis[..., 1, 0])
    q = torch.view_as_real(torch.view_as_complex(xq.float().unflatten(-1, (-1, 2))) * rot).flatten(-2)
    k = torch.view_as_real(torch.view_as_complex(xk.float().unflatten(-1, (-1, 2))) * rot).flatten(-2)
    return q.type_as(xq), k.type_as(xk)


def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Non-causal, unmasked SDPA with the fastest backend the device has. (B, H, L, D) -> same."""
    if q.is_cuda:
        with sdpa_kernel(_SDPA_ORDER, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The selected backend on Q and K that are already rotated; (B, H, L, D) in and out."""
    if _backend == "fp8":
        from flux2_bench.kernels.fp8_attention import fp8_attention

        return fp8_attention(q, k, v)
    return sdpa(q, k, v)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor) -> Tensor:
    """RoPE + attention over the joint sequence; (B, H, L, D) in, (B, L, H*D) out."""
    q, k = apply_rope(q, k, pe)
    return attend(q, k, v).transpose(1, 2).flatten(2)
