"""Channel the N-way output layer into a module's two logits, and choose MC-BLN features."""

from __future__ import annotations

import torch

from ..trace.graph import Graph, Node

LOGITS_HEAD = "cnnmod.logits"  # the head appended after a classifier that is not a Linear layer


def append_logits_head(graph: Graph, weights: dict[str, torch.Tensor], num_outputs: int) -> tuple[Graph, dict]:
    """Append an identity Linear layer over the model's K logits (SqueezeNet ends in conv, ReLU, pooling).

    Channeling this head gives z_c and the mean of the other logits, the paper's two logits as a
    fixed combination of the model's own; MC-BLN does not apply to it (its "features" are logits).
    """
    node = Node(LOGITS_HEAD, "linear", [graph.output], {"bias": True, "logits": True})
    eye = torch.eye(num_outputs)
    return Graph([*graph.nodes, node], LOGITS_HEAD), dict(weights, **{f"{LOGITS_HEAD}.weight": eye,
                                                                      f"{LOGITS_HEAD}.bias": torch.zeros(num_outputs)})


def channel_head(weight: torch.Tensor, bias: torch.Tensor | None, c: int,
                 totals: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the 2-logit head of class ``c``: row 0 not-concern (mean of the others), row 1 concern.

    z_c = W[c] . h + b[c] and z_nc = mean over j != c of (W[j] . h + b[j]). The others' mean is
    the total over all classes less class c's own (``head_totals``, in float64), so that a
    parent's modules take the totals once rather than each a (K-1) x F copy of the head: 1,000
    such copies of 8 MB grew a 1,000-class ResNet-50 decomposition by 6.6 MB per module (heap
    fragmentation; measured in issue #16).
    """
    k = weight.shape[0]
    b = bias if bias is not None else torch.zeros(k, dtype=weight.dtype)
    sum_w, sum_b = totals if totals is not None else head_totals(weight, bias)
    w_nc = ((sum_w - weight[c].double()) / (k - 1)).to(weight.dtype)
    b_nc = ((sum_b - b[c].double()) / (k - 1)).to(b.dtype)
    return torch.stack([w_nc, weight[c]]), torch.stack([b_nc, b[c]])


def head_totals(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The head's rows and biases summed over every class, in float64 (for ``channel_head``)."""
    return weight.double().sum(0), (bias.double().sum() if bias is not None else torch.zeros((), dtype=torch.float64))


def mc_bln_features(head_weight: torch.Tensor, delta: float = 0.5) -> torch.Tensor:
    """Return the head-input features MC-BLN removes (bool (F,)) from a channeled head (2, F).

    Algorithm 2 of the paper prints ``W[i,nc] <= -delta and W[i,c] >= +delta``, which would
    remove features that support the concern, contradicting its own text ("nodes only connected
    to the unconcerned node"). We follow the text: remove feature i when its weight goes strongly
    to not-concern and not to concern, ``W[i,nc] >= delta and |W[i,c]| < delta``.
    """
    w_nc, w_c = head_weight[0], head_weight[1]
    return (w_nc >= delta) & (w_c.abs() < delta)
