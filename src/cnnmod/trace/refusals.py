"""What the capture says when it cannot capture: where in the user's source, and how to write it.

A refusal is one sentence: the construct, the ``file:line`` of the user's own source it comes from
(the innermost frame outside torch and cnnmod; a lambda layer also names where its lambda is
defined, which export's trace leaves out) and the nearest supported way to write it (``HINTS``,
``USAGE``). torch.export's own logs are silenced while it runs (``quiet``): the refusal says it all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import traceback
import types
import warnings

import torch
import torch.fx as fx
import torch.nn as nn

_TORCH = os.path.dirname(torch.__file__)
_CNNMOD = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def quiet():
    """torch.export logs graph dumps and warnings of its own when it gives up: the refusal says it all."""
    loggers = [logging.getLogger(name) for name in ("torch._dynamo", "torch._export", "torch.export",
                                                    "torch.fx.experimental.symbolic_shapes", "torch._subclasses")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def export_failure(model: nn.Module, e: Exception) -> str:
    """One sentence: where in the user's code the model could not be run symbolically, and why."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    frames = [f for f, _ in traceback.walk_tb(e.__traceback__)]
    user = [f for f in frames if not f.f_code.co_filename.startswith((_TORCH, _CNNMOD))]
    where = f"{short(user[-1].f_code.co_filename)}:{user[-1].f_lineno}" if user else "the model's forward"
    names = {id(m): n for n, m in model.named_modules()}
    module = next((names[id(f.f_locals["self"])] for f in reversed(user) if id(f.f_locals.get("self")) in names), None)
    inside = f" in module {module or '<top level>'!r}" if module is not None else ""
    if "data-dependent" in text or "GuardOnDataDependent" in type(e).__name__ or "data dependent" in text:
        return (f"cannot capture the model: {where}{inside} branches on the values of a tensor (data-dependent "
                "control flow); compute the same operations for every input, or move the choice out of the model.")
    if "batch" in text and ("Constraints violated" in text or "specializ" in text):
        return (f"cannot capture the model: {where}{inside} fixes or constrains the batch size; write the batch "
                "dimension as x.size(0) or -1, and nothing that depends on its value.")
    return f"cannot capture the model: {where}{inside}: {type(e).__name__}: {text[:200]}."


def short(path: str) -> str:
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else path


RESHAPE_HINT = ("supported: flattening to (batch, -1), channel shuffles (reshape, transpose or permute, "
                 "reshape back), a Conv1d across pooled channels (squeeze, transpose, Conv1d and back), and "
                 "slices, splits and chunks of the channels")


def where_in_source(node: fx.Node, modules: dict) -> str:
    """``file:line`` of the user's source a captured call comes from, and the module it is in."""
    frames = re.findall(r'File "(.+?)", line (\d+), in \S+\n\s*(.*)', node.meta.get("stack_trace") or "")
    user = [f for f in frames if not f[0].startswith((_TORCH, _CNNMOD))]
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    module = f" in module {stack[-1][0]!r}" if stack and stack[-1][0] else ""
    # export's trace omits a lambda's own frame (a lambda layer's shortcut): name where it is defined
    lambdas = [f for f in getattr(modules.get(stack[-1][0]), "__dict__", {}).values()
               if isinstance(f, types.FunctionType) and f.__name__ == "<lambda>"] if stack else []
    if lambdas:
        code = lambdas[0].__code__
        module += f" (its lambda at {short(code.co_filename)}:{code.co_firstlineno})"
    if not user:
        return f"operation {node.name!r}{module}"
    path, line, code = user[-1]
    return f"{short(path)}:{line}{module}: `{code.strip()}`"


# The nearest supported way to write what users most often write that cnnmod cannot capture.
HINTS = {
    "index": "pick channels with slices (x[:, a:b]), torch.split or chunk; a list or tensor of indices is not "
             "supported",
    "select": "keep the dimension with a slice (x[:, i:i + 1]) instead of an integer index (x[:, i])",
    "expand": "multiply by the smaller tensor directly: broadcasting needs no expand",
    "where": "write the choice as an activation (F.leaky_relu, torch.clamp) or a product with a gate",
    "matmul": "products of two activations (attention) are not supported; linear layers are",
    "bmm": "products of two activations (attention) are not supported; linear layers are",
    "softmax": "return the logits (or F.log_softmax of them); a softmax of the classes is not supported",
    "conv1d": "a Conv1d is captured across the channels of a pooled value (conv(y.squeeze(-1).transpose(-1, -2)) "
              "of a (batch, channels, 1, 1) y); elsewhere mix channels with a 1x1 Conv2d",
}
for _new in ("zeros", "zeros_like", "new_zeros", "ones", "ones_like", "new_ones", "full", "full_like", "empty",
             "arange", "randn", "rand", "scalar_tensor", "tensor"):
    HINTS[_new] = ("create no tensors in forward: pad channels with zeros by F.pad(x, (0, 0, 0, 0, 0, k)), keep "
                    "constants as registered buffers")
HINTS["adaptive_max_pool2d"] = "pool the whole map with x.amax((2, 3), keepdim=True)"
for _cmp in ("gt", "lt", "ge", "le", "eq", "ne"):
    HINTS[_cmp] = "comparisons are not supported: write the choice as an activation (F.leaky_relu, torch.clamp)"


def hint(aten: str, known) -> str:
    """The nearest supported way to write an operation cnnmod does not know (else the ones it does)."""
    return HINTS.get(aten.rstrip("_"), "the operations cnnmod knows: " +
                     ", ".join(sorted({name for name in known if not name.endswith("_")})))


USAGE = {"add": "expected the sum of two tensors of the network, or a tensor and a number",
          "sub": "expected the difference of two tensors of the network, or a tensor and a number",
          "mul": "expected the product of two tensors, of a tensor and a number, or of a tensor and one parameter",
          "cat": "expected a concatenation along the channels (dim=1)",
          "mean": "expected a spatial mean over dims (2, 3)", "amax": "expected a spatial amax over dims (2, 3)",
          "permute": "expected a permute that keeps the batch first",
          "pad": "expected padding of the rows, columns or channels"}


def usage(aten: str) -> str:
    return USAGE.get(aten.rstrip("_"), "this use of it is not supported")
