"""The causal language-model loss of transformers' `ForCausalLMLoss`: shift by one, fp32 cross-entropy over the
labelled tokens (label -100 = not scored), summed and divided by the number of labelled tokens — or by
`num_items`, the labelled tokens of a whole global batch, so that gradient accumulation and data-parallel workers
add up to the gradient of the batch taken at once.

Only the positions that carry a label go through the output projection: the (tokens, vocab) logits of a prompt's
unlabelled part (image tokens, the user's turns) are never formed. Each scored row is the same dot products as in
the full logits, so the loss equals transformers' (which projects every position) up to summation order.
"""
from __future__ import annotations

from typing import Optional, Tuple

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

IGNORE_INDEX = -100


def scored_positions(labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(flat indices into the (B·(S−1)) hidden rows that predict a label, their target ids) — host side.

    labels (B, S): the token each position should be, -100 where not scored; position t predicts labels[t + 1].
    """
    targets = labels[:, 1:].reshape(-1)
    index = np.flatnonzero(targets != IGNORE_INDEX).astype(np.int32)
    return index, targets[index].astype(np.int32)


def causal_lm_loss(hidden: Tensor, labels: np.ndarray, project, num_items: Optional[float] = None) -> Tensor:
    """hidden (B, S, H) final hidden states; labels (B, S) host int array; project: (N, H) → (N, vocab) fp32
    logits. Returns the fp32 scalar loss: sum of −log p(label) over scored tokens / (num_items or their count).
    A batch without any label gives 0 (its sum), not NaN, when num_items is given; else it is an error upstream."""
    b, s, h = hidden.shape
    index, targets = scored_positions(labels)
    count = float(num_items) if num_items is not None else float(len(index))
    if len(index) == 0:
        return (hidden.sum() * 0).astype(ms.float32)  # keeps the graph connected: zero gradients
    rows = ops.gather(hidden[:, :-1].reshape(b * (s - 1), h), Tensor(index), 0)
    logits = project(rows).astype(ms.float32)
    logp = ops.log_softmax(logits, -1)
    picked = ops.gather_elements(logp, 1, Tensor(targets[:, None]))
    return -picked.sum() / count
