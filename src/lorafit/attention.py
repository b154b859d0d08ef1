"""Which attention kernel a run uses: PyTorch's SDPA as autocast gives it, or SDPA in fp32.

Under bf16 autocast, transformers hands scaled-dot-product attention bf16 queries, keys
and values. On some CPUs PyTorch's fused CPU kernel is slower in bf16 than in fp32 (an
AMD EPYC with AVX512-BF16: forward + backward at 16 x 12 heads x 256 x 32 took 1.3x as
long; results/levers.json), and fp32 is also the more precise of the two. So:

    sdpa       transformers' SDPA, in the dtype autocast gives it
    sdpa-fp32  the same SDPA with q, k, v cast to fp32 and autocast off inside; the output
               goes back to the input's dtype. Only attention changes; every linear layer
               stays in bf16.
    auto       sdpa-fp32 where it is measured faster: on CPU under bf16, a short timing
               of both at the run's shape (forward + backward, best of a few alternated
               trials), cached per CPU model, torch version, threads and shape in
               $LORAFIT_CACHE/attention.json; sdpa on CUDA and in fp32.

A run records what it used (`attention_resolved` in config.json); resuming, evaluating
and predicting use the recorded kernel. Architectures whose attention does not go through
transformers' SDPA interface keep their own.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

ATTENTIONS = ("auto", "sdpa", "sdpa-fp32")
_FP32_NAME = "lorafit_sdpa_fp32"  # the name registered with transformers' attention interface
_registered = False


def _sdpa_fp32(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs):
    """transformers' attention interface: q, k, v (B, heads, T, d) -> ((B, T, heads, d), None),
    computed by transformers' SDPA in fp32 with autocast off, returned in the input dtype."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    with torch.autocast(query.device.type, enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
    return out.to(dtype), weights


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(_FP32_NAME, _sdpa_fp32)
    AttentionMaskInterface.register(_FP32_NAME, sdpa_mask)  # the same boolean mask SDPA gets
    _registered = True


def set_attention(model: nn.Module, attention: str) -> str:
    """Make `model` run `attention` (`sdpa` or `sdpa-fp32`); returns what it runs now.

    A model whose attention is not transformers' SDPA (an architecture without it, or one
    loaded with another implementation) keeps its own; the return value then names it.
    """
    current = model.config._attn_implementation
    if current not in ("sdpa", _FP32_NAME):
        return current
    if attention == "sdpa-fp32":
        _register()
    model.config._attn_implementation = _FP32_NAME if attention == "sdpa-fp32" else "sdpa"
    return attention


def attention_of(model: nn.Module) -> str:
    """`sdpa`, `sdpa-fp32`, or the model's own implementation's name."""
    current = model.config._attn_implementation
    return "sdpa-fp32" if current == _FP32_NAME else current


def time_both(batch: int, heads: int, length: int, head_dim: int, trials: int = 3) -> dict[str, float]:
    """Best seconds of SDPA forward + backward on bf16 q, k, v (B, heads, T, d) and of the
    same computed in fp32 (cast in and out), alternated; a padding mask like a real batch's."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, length, head_dim, generator=g, dtype=torch.bfloat16) for _ in range(3))
    grad = torch.randn(batch, heads, length, head_dim, generator=g, dtype=torch.bfloat16)
    mask = (torch.arange(length)[None] < torch.linspace(length // 2, length, batch).long()[:, None])[:, None, None]

    def run(fp32: bool) -> float:
        a, b, c = ((x.float() if fp32 else x).requires_grad_() for x in (q.clone(), k.clone(), v.clone()))
        t = time.perf_counter()
        out = F.scaled_dot_product_attention(a, b, c, attn_mask=mask)
        out.backward(grad.float() if fp32 else grad)
        return time.perf_counter() - t

    from lorafit.measured import best_of_alternated

    return best_of_alternated({"sdpa": lambda: run(False), "sdpa-fp32": lambda: run(True)}, trials)


def resolve_attention(attention: str, device: torch.device, precision: str, shape: tuple[int, int, int, int]) -> str:
    """`auto` -> `sdpa-fp32` or `sdpa` (see the module docstring); other choices as given.

    `shape` is (batch, heads, max_length, head_dim) of one process's batches. A timing is
    kept per CPU model, torch version, thread count and shape, so a machine decides once.
    """
    if attention != "auto":
        return attention
    if device.type != "cpu" or precision != "bf16":
        return "sdpa"
    from lorafit.measured import cached_choice, machine_key

    def measure() -> dict:
        times = time_both(*shape)
        choice = "sdpa-fp32" if times["sdpa-fp32"] < 0.97 * times["sdpa"] else "sdpa"  # a clear win, not noise
        return {"choice": choice, "seconds": times}

    return cached_choice("attention", machine_key("x".join(map(str, shape))), measure)
