"""Closed-form re-fitting of the layers that read removed channels (no gradient training).

After channels are removed, each convolution or linear layer that read them sees fewer inputs.
Following He et al. 2017 ("Channel pruning for accelerating very deep neural networks"), each
such layer's remaining weights are re-fitted by ridge least squares so that its output on a
few hundred sample images matches the parent's output, layer after layer in execution order,
each fitted on the inputs the module itself produces (so errors do not pile up). A per-channel
offset is fitted too. Cost: one pass over the sample and one small linear solve per layer. A
linear layer of more than 4,096 inputs (VGG's and AlexNet's classifiers) is not re-fitted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..trace.network import GraphNetwork

CHUNK = 64  # images per chunk of the normal equations
MAX_LINEAR_INPUTS = 4096  # a linear layer with more inputs is not re-fitted (ResNet-50's head has 2,048)


def _patches(node, x: torch.Tensor, kernel: tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W) -> (N * L, C * kh * kw): the inputs each output position of the conv sees."""
    a = node.attrs
    padding = a["padding"]
    if isinstance(padding, str):  # "same" / "valid": F.unfold takes numbers
        padding = [(k - 1) * d // 2 for k, d in zip(kernel, a["dilation"])] if padding == "same" else [0, 0]
    cols = F.unfold(x, kernel, dilation=a["dilation"], padding=padding, stride=a["stride"])
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def _ridge(chunks, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve target ~ inputs @ W.T + o in float64 over (inputs, target) chunks; return (W, o).

    The normal equations are summed chunk by chunk, so a large sample never needs its whole
    patch matrix in memory (1,024 CIFAR images at 32x32 would be a 1M x 145 float64 matrix).
    """
    gram = cross = None
    for inputs, target in chunks:
        a = torch.cat([inputs.double(), torch.ones(len(inputs), 1, dtype=torch.float64)], 1)
        g, c = a.T @ a, a.T @ target.double()
        gram, cross = (g, c) if gram is None else (gram + g, cross + c)
    gram += ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=torch.float64)
    sol = torch.linalg.solve(gram, cross)  # (D + 1, Cout)
    return sol[:-1].T.float(), sol[-1].float()


@torch.no_grad()
def reconstruct_(small: GraphNetwork, targets: dict[str, torch.Tensor], out_index: dict[str, torch.Tensor | None],
                 x: torch.Tensor, ridge: float = 1e-3, *, cache: dict | None = None,
                 cacheable: set[str] = frozenset()) -> None:
    """Re-fit the layers of ``small`` named in ``targets`` (their parent outputs on ``x``).

    ``out_index[name]`` says which of the parent's output channels the small layer kept (None: all).
    ``cache``: re-fits of ``cacheable`` layers (the same in every module of a parent) are taken
    from it when there and stored into it when computed.
    """
    def fit(node, xs):
        if node.name not in targets:
            return
        if cache is not None and node.name in cache:
            weight, addmap = cache[node.name]
            small.set_weight(f"{node.name}.weight", weight)
            small.set_weight(f"{node.name}.addmap", addmap)
            return
        if node.op == "linear" and small.weight(f"{node.name}.weight").shape[1] > MAX_LINEAR_INPUTS:
            # VGG's 25,088-input classifier: its normal equations take 5 GB and minutes, for a fit
            # with a hundred times more unknowns per output than sample images. The layer keeps its
            # removed channels' constant (exact for the masked parent) without a re-fit.
            return
        target = targets[node.name]
        if out_index.get(node.name) is not None:
            target = target[:, out_index[node.name]]
        weight = small.weight(f"{node.name}.weight")
        bias = small.weight(f"{node.name}.bias")
        addmap = small.weight(f"{node.name}.addmap")  # every layer that reads removed channels has one (extract)
        fixed = (0 if bias is None else bias.view(1, -1, *[1] * (target.dim() - 2))) + \
            (0 if addmap is None else addmap.unsqueeze(0))
        residual = target - fixed  # what the weights (and an offset) must produce
        if weight.shape[1] == 0:  # every channel it read was removed (half of a split): only a constant is left
            offset = residual.mean(0)
        elif node.op == "conv":
            def chunks():
                for x_part, r_part in zip(xs[0].split(CHUNK), residual.split(CHUNK)):
                    yield (_patches(node, x_part, tuple(weight.shape[2:])),
                           r_part.permute(0, 2, 3, 1).reshape(-1, r_part.shape[1]))
            w, o = _ridge(chunks(), ridge)
            weight, offset = w.view_as(weight), o.view(-1, 1, 1)
        else:  # linear
            weight, offset = _ridge([(xs[0], residual)], ridge)
        addmap = addmap + offset
        small.set_weight(f"{node.name}.weight", weight)  # new tensors: the parent's are never written
        small.set_weight(f"{node.name}.addmap", addmap)
        if cache is not None and node.name in cacheable:
            cache[node.name] = (weight, addmap)

    small.run_all(x, keep=False, before=fit)
