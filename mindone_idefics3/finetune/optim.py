"""Optimisation pieces: AdamW (torch's algorithm: decoupled weight decay, bias-corrected moments; MindSpore's fused
kernel, in place, one parameter at a time), transformers' learning-rate schedules, torch's gradient clipping.

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
    """torch.optim.AdamW over `params`, with the learning rate set per step (`step(grads, lr)`).

    Each parameter is updated in place by MindSpore's fused `AdamWeightDecay` kernel, torch's bias corrections
    folded into its learning rate, epsilon and decay (below). MindSpore's `experimental.optim.AdamW` updates every
    parameter in one compiled graph, and a compiled graph keeps its intermediates until it ends: for full
    fine-tuning of SmolVLM-256M that held ~10 temporaries of every trainable weight at once (+7.5 GB at the first
    step), beside a third, AMSGrad-only moment it allocates always (benchmarks/finetune_memory.py). A compiled
    update per parameter still grew the process by 1.7 GB (its temporaries, kept by the memory pool); the fused
    kernel writes weights and moments in place. The state is exactly the two fp32 moments.
    """

    def __init__(self, params: Sequence[Parameter], lr: float, betas: Tuple[float, float], eps: float,
                 weight_decay: float):
        self.params = list(params)
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.exp_avg = [moment("exp_avg", i, np.zeros(p.shape, np.float32)) for i, p in enumerate(self.params)]
        self.exp_avg_sq = [moment("exp_avg_sq", i, np.zeros(p.shape, np.float32)) for i, p in enumerate(self.params)]
        self.state_step = 0
        self._update = ops.AdamWeightDecay()

    def state_tensors(self) -> List[List[Tensor]]:
        """The optimizer's state (the two moments per parameter), for memory accounting."""
        return [self.exp_avg, self.exp_avg_sq]

    def step(self, grads: Sequence[Tensor], lr: float, grad_scale: float = 1.0) -> None:
        """One update with gradients `grads` · grad_scale at learning rate lr.

        torch: p ← p(1 − lr·wd) − lr/bc1 · m / (√v / √bc2 + eps), bc_i = 1 − beta_i^t. The fused kernel computes
        p ← p − lr'·(m / (√v + eps') + wd'·p); multiplying the fraction by √bc2 / √bc2 gives torch's update with
        lr' = lr·√bc2 / bc1, eps' = eps·√bc2 and wd' = lr·wd / lr' (the moments are torch's as they are)."""
        self.state_step += 1
        beta1, beta2 = self.betas
        t = self.state_step  # bias corrections in float64 on the host, as torch's (non-capturable) AdamW
        root_bc2 = math.sqrt(1.0 - beta2 ** t)
        step_lr = lr * root_bc2 / (1.0 - beta1 ** t)
        decay = lr * self.weight_decay / step_lr if step_lr else 0.0
        scalars = [Tensor(np.float32(x)) for x in (step_lr, beta1, beta2, self.eps * root_bc2, decay)]
        scale = None if grad_scale == 1.0 else Tensor(np.float32(grad_scale))
        for p, g, m, v in zip(self.params, grads, self.exp_avg, self.exp_avg_sq):
            g = g.astype(ms.float32) if g.dtype != ms.float32 else g
            self._update(p, m, v, *scalars, g if scale is None else g * scale)  # one weight's scaled copy at a time

    def state(self) -> dict:
        """Moments and step count as numpy arrays (keys by parameter position)."""
        out = {"step": np.array([self.state_step], np.int32)}
        for i, (m, v) in enumerate(zip(self.exp_avg, self.exp_avg_sq)):  # copies: asnumpy may share memory
            out[f"exp_avg.{i}"], out[f"exp_avg_sq.{i}"] = m.asnumpy().copy(), v.asnumpy().copy()
        return out

    def load_state(self, state: dict) -> None:
        self.state_step = int(state["step"].reshape(-1)[0])
        self.exp_avg = [moment("exp_avg", i, state[f"exp_avg.{i}"]) for i in range(len(self.params))]
        self.exp_avg_sq = [moment("exp_avg_sq", i, state[f"exp_avg_sq.{i}"]) for i in range(len(self.params))]


def moment(kind: str, i: int, value: np.ndarray) -> Parameter:
    return Parameter(Tensor(value.astype(np.float32)), name=f"{kind}.{i}", requires_grad=False)


def grad_norm(grads: Sequence[Tensor]) -> float:
    """The global L2 norm of `grads` (torch's clip_grad_norm_ total norm)."""
    norms = [ops.norm(g if g.dtype == ms.float32 else g.astype(ms.float32)) for g in grads]
    return float(ops.norm(ops.stack(norms)).asnumpy())


def clip_coefficient(total_norm: float, max_norm: float) -> float:
    """The factor torch.nn.utils.clip_grad_norm_ scales the gradients by: max_norm / (norm + 1e-6) when that is
    below 1; 1 with max_norm <= 0 (off) or a non-finite norm."""
    if max_norm <= 0 or not np.isfinite(total_norm):
        return 1.0
    return min(1.0, max_norm / (total_norm + 1e-6))


def clip_grad_norm(grads: List[Tensor], max_norm: float) -> Tuple[List[Tensor], float]:
    """(clipped grads, the total norm before clipping), as torch.nn.utils.clip_grad_norm_ (max_norm <= 0: off,
    the norm is still returned)."""
    total_value = grad_norm(grads)
    coef = clip_coefficient(total_value, max_norm)
    return (grads if coef >= 1.0 else [g * coef for g in grads]), total_value
