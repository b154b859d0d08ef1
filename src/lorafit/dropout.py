"""Dropout whose masks cost less to draw on CPU.

PyTorch's CPU dropout draws one Bernoulli sample per element (`bernoulli_`, ~12 ms for a
16 x 256 x 384 activation on one core): 13% of a LoRA training step of all-MiniLM-L6-v2
(results/profile.json). `FastDropout` draws 64 random bits per four elements
(`torch.randint` over int64, viewed as int16) and keeps an element where its 16 bits are
at or above a threshold, about 4x cheaper (results/levers.json). The drop probability is
`round(p * 65536) / 65536` (for p = 0.1: 0.100006) and the kept values are scaled by the
inverse of the keep probability actually used, so the output's expectation is the input,
as with `nn.Dropout`. The bits come from torch's default generator, so seeding, resuming
(its state is in every checkpoint) and per-step reseeding under torchrun work as before.

On other devices, or with p of 0 or 1, it is `nn.Dropout`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_LEVELS = 1 << 16  # 16 random bits per element


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> tuple[torch.Tensor, float]:
    """A bool mask of `shape` (True: keep) with drop probability ~p, and the scale 1 / P(keep).

    Draws ceil(n / 4) int64 words from the default CPU generator; each gives four 16-bit
    lanes. Raises ValueError for p outside (0, 1).
    """
    if not 0 < p < 1:
        raise ValueError(f"keep_mask needs 0 < p < 1, got {p}")
    n = 1
    for d in shape:
        n *= d
    words = torch.randint(-(1 << 63), (1 << 63) - 1, ((n + 3) // 4,), dtype=torch.int64)
    lanes = words.view(torch.int16)[:n].view(shape)
    dropped = round(p * _LEVELS)
    keep = lanes >= (-(1 << 15) + dropped)  # int16 lanes are uniform on [-32768, 32767]
    return keep, _LEVELS / (_LEVELS - dropped)


class _ScaleByMask(torch.autograd.Function):
    """y = x * keep * scale; dy/dx the same mask and scale (the mask is saved as bool)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.ops.aten.native_dropout_backward(x, keep, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.ops.aten.native_dropout_backward(grad, keep, ctx.scale), None, None


class FastDropout(nn.Dropout):
    """`nn.Dropout` with cheaper masks on CPU (see the module docstring); same `p`, same API."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.device.type != "cpu" or not 0 < self.p < 1:
            return F.dropout(x, self.p, self.training, self.inplace)
        keep, scale = keep_mask(x.shape, self.p)
        return _ScaleByMask.apply(x, keep, scale)


def use_fast_dropout(model: nn.Module) -> int:
    """Swap every plain `nn.Dropout` in `model` for a `FastDropout` of the same p; returns how many.

    Idempotent. Modules only read for their `p` (attention dropout handed to SDPA) keep it.
    """
    swapped = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Dropout:
                setattr(module, child_name, FastDropout(child.p, child.inplace))
                swapped += 1
    return swapped
