"""Several processes or machines with torch's own engine: ``torchrun ... -m cnnmod decompose``.

torchrun sets RANK, WORLD_SIZE and the rendezvous variables; we join the process group
(gloo on CPU, nccl on CUDA), each rank counts its share of the batches, the counts are summed
with all_reduce (bit tables OR-ed), and rank 0 writes the files. Counts are integers and bits
are bits, so the reduction is exact and the files are byte-identical to a single process's.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .errors import CnnmodError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is CUDA when available, else CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CnnmodError(f"expected a CUDA device for --device {name}, found none on this machine.")
    if not (name == "cpu" or name.startswith("cuda")):
        raise CnnmodError(f"expected --device cpu, cuda or auto, found {name!r}.")
    return torch.device(name)


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun describes; return False when running alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        # With CUDA, device tensors go through nccl and the small CPU tallies through gloo.
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            # Ranks beyond the GPU count share GPUs round-robin (NCCL itself may refuse two ranks on one GPU).
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group(backend)
    return True


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum_(tensor: torch.Tensor) -> None:
    """Sum ``tensor`` over all ranks, in place (through int64: exact for counts of any width)."""
    if rank_and_world()[1] == 1:
        return
    wide = tensor.to(torch.int64) if not tensor.is_floating_point() else tensor
    dist.all_reduce(wide)
    tensor.copy_(wide)


def all_reduce_or_(tensor: torch.Tensor) -> None:
    """OR a uint8 bit table over all ranks, in place."""
    if rank_and_world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.BOR)


def finish() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def check_resume_alone(resume: bool) -> None:
    if resume and rank_and_world()[1] > 1:
        raise CnnmodError("expected --resume in a single process, found a torchrun group; resume alone.")
