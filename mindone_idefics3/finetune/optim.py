"""Optimisation pieces: AdamW (MindSpore's `mindspore.experimental.optim.AdamW`, which computes torch's AdamW:
decoupled weight decay, bias-corrected moments), transformers' learning-rate schedules, torch's gradient clipping.

The schedules are the formulas of `transformers.get_scheduler` (linear / cosine / constant, with warmup) as a
function of the optimiser step; the clipping is `torch.nn.utils.clip_grad_norm_` (global L2 norm, scale by
max_norm / (norm + 1e-6) when that is below 1).
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, ops

from ..errors import Idefics3Error

SCHEDULES = ("linear", "cosine", "constant")


def lr_factor(kind: str, step: int, warmup: int, total: int) -> float:
    """The multiplier of the base learning rate at optimiser step `step` (0-based), as transformers' schedulers
    give it (`get_scheduler(kind, ...)`; "constant" with warmup is its constant_with_warmup)."""
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, (total - step) / max(1, total - warmup))
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise Idefics3Error(f"--lr-scheduler must be one of {', '.join(SCHEDULES)}, got {kind!r}")


class AdamW:
    """torch.optim.AdamW over `params`, with the learning rate set per step (`step(grads, lr)`)."""

    def __init__(self, params: Sequence[Parameter], lr: float, betas: Tuple[float, float], eps: float,
                 weight_decay: float):
        from mindspore.experimental.optim import AdamW as MsAdamW

        self.params = list(params)
        self.optimizer = MsAdamW(self.params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        self._lr = self.optimizer.param_groups[0]["lr"]

    def step(self, grads: Sequence[Tensor], lr: float) -> None:
        ops.assign(self._lr, Tensor(lr, ms.float32))  # an op, ordered with the update (set_data was seen late)
        self.optimizer(tuple(grads))

    def state(self) -> dict:
        """Moments and step count as numpy arrays (keys by parameter position)."""
        out = {"step": self.optimizer.state_step.asnumpy().reshape(1).copy()}  # copies: asnumpy may share memory
        for i, (m, v) in enumerate(zip(self.optimizer.exp_avg, self.optimizer.exp_avg_sq)):
            out[f"exp_avg.{i}"], out[f"exp_avg_sq.{i}"] = m.asnumpy().copy(), v.asnumpy().copy()
        return out

    def load_state(self, state: dict) -> None:
        self.optimizer.state_step.set_data(Tensor(state["step"].reshape(()), ms.int32))
        for i, (m, v) in enumerate(zip(self.optimizer.exp_avg, self.optimizer.exp_avg_sq)):
            m.set_data(Tensor(state[f"exp_avg.{i}"], m.dtype))
            v.set_data(Tensor(state[f"exp_avg_sq.{i}"], v.dtype))


def clip_grad_norm(grads: List[Tensor], max_norm: float) -> Tuple[List[Tensor], float]:
    """(clipped grads, the total norm before clipping), as torch.nn.utils.clip_grad_norm_ (max_norm <= 0: off,
    the norm is still returned)."""
    norms = ops.stack([ops.norm(g.astype(ms.float32)) for g in grads])
    total = ops.norm(norms)
    total_value = float(total.asnumpy())
    if max_norm <= 0 or not np.isfinite(total_value):
        return grads, total_value
    coef = min(1.0, max_norm / (total_value + 1e-6))
    if coef >= 1.0:
        return grads, total_value
    return [g * coef for g in grads], total_value
