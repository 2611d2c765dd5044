"""The official MoFO update as a plain per-tensor ``torch.topk`` loop: the baseline to beat.

This re-implements, in our own code, the algorithm of the authors' reference
optimizer (``AdamW_MoFO`` in github.com/YChen-zzz/MoFO), which selopt's step
(``docs/design.md`` §1) follows: for every parameter tensor, one after the other,

1. decoupled decay of every entry, ``p *= 1 - lr*wd``;
2. dense fp32 moments, ``m = lerp(m, g, 1-b1)``, ``v = b2*v + (1-b2)*g*g``;
3. ``k = floor(fraction * numel)``, threshold = the k-th largest ``|m|``
   found with ``torch.topk`` on the flattened tensor;
4. ``p -= lr/bc1 * where(|m| >= thr, m, 0) / (sqrt(v)/sqrt(bc2) + eps)``.

Groups without ``fraction`` (the official code gives norms and biases none)
take the dense AdamW step. Two deliberate differences from the original, both
outside what is timed: ``k`` is at least 1 (the original crashes at 0; see
``docs/design.md`` §1, step 3), and the step count is a Python int per tensor, as there.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


class OfficialMoFO(torch.optim.Optimizer):
    """Per-tensor top-k MoFO with fp32 moments, the way the authors' code runs it.

    >>> w = torch.nn.Parameter(torch.zeros(10))
    >>> w.grad = torch.arange(10.0)
    >>> opt = OfficialMoFO([w], lr=0.1, weight_decay=0.0, fraction=0.2)
    >>> opt.step()
    >>> int((w != 0).sum())
    2
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        fraction: float | None = 0.15,
    ):
        if not 0.0 <= lr:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if fraction is not None and not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be None (dense) or in (0, 1], got {fraction}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fraction=fraction))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, weight_decay, fraction = group["lr"], group["eps"], group["weight_decay"], group["fraction"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if weight_decay != 0:
                    p.mul_(1 - lr * weight_decay)
                g = p.grad.to(torch.float32)
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                step_size = lr / (1 - beta1 ** state["step"])
                denom = (v.sqrt() / math.sqrt(1 - beta2 ** state["step"])).add_(eps)
                if fraction is None or fraction >= 1.0:
                    p.addcdiv_(m, denom, value=-step_size)
                    continue
                magnitude = m.abs()
                k = max(1, int(p.numel() * fraction))
                threshold = torch.topk(magnitude.view(-1), k).values.min()
                p.addcdiv_(torch.where(magnitude >= threshold, m, 0), denom, value=-step_size)
        return loss

