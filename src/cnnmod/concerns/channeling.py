"""Channel the N-way output layer into a module's two logits, and choose MC-BLN features."""

from __future__ import annotations

import torch


def channel_head(weight: torch.Tensor, bias: torch.Tensor | None, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the 2-logit head of class ``c``: row 0 not-concern (mean of the others), row 1 concern.

    z_c = W[c] . h + b[c] and z_nc = mean over j != c of (W[j] . h + b[j]).
    """
    k = weight.shape[0]
    others = torch.arange(k) != c
    b = bias if bias is not None else torch.zeros(k, dtype=weight.dtype)
    w2 = torch.stack([weight[others].mean(0), weight[c]])  # (2, F)
    b2 = torch.stack([b[others].mean(), b[c]])  # (2,)
    return w2, b2


def mc_bln_features(head_weight: torch.Tensor, delta: float = 0.5) -> torch.Tensor:
    """Return the head-input features MC-BLN removes (bool (F,)) from a channeled head (2, F).

    Algorithm 2 of the paper prints ``W[i,nc] <= -delta and W[i,c] >= +delta``, which would
    remove features that support the concern, contradicting its own text ("nodes only connected
    to the unconcerned node"). We follow the text: remove feature i when its weight goes strongly
    to not-concern and not to concern, ``W[i,nc] >= delta and |W[i,c]| < delta``.
    """
    w_nc, w_c = head_weight[0], head_weight[1]
    return (w_nc >= delta) & (w_c.abs() < delta)
