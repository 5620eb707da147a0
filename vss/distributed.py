"""Distributed set-up from torchrun's environment, and the few collectives the training and
evaluation loops need.

Not a paper component: the engineering the DVIS++ recipe assumes (8 GPUs, one clip each,
DVIS_Plus `configs/dvis_Plus/VSPW/*.yaml`). `torchrun --nproc_per_node 8 train.py` sets RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; `init_distributed` reads them and returns
the state explicitly (no patched `print`, no mutated argparse namespace). Without those
variables everything runs as a single process and the collectives are identities, so the same
code path serves a laptop and a cluster.

Collectives return a NEW tensor and never modify their input: callers write
`cm = all_reduce_sum(cm)`. (torchvision's `reduce_across_processes` had the same contract and its
caller threw the result away for 16 months; the tests cover it.)
"""

from __future__ import annotations

from dataclasses import dataclass
import gc
import os

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    enabled: bool  # a process group was initialised (launched by torchrun with WORLD_SIZE > 1)
    rank: int
    local_rank: int
    world_size: int
    device: torch.device


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _resolve_device(device_pref: str, local_rank: int) -> torch.device:
    if device_pref not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device_pref must be 'auto', 'cpu' or 'cuda', got {device_pref!r}")
    use_cuda = device_pref == "cuda" or (device_pref == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but CUDA is not available")
    return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Initialise the process group when launched by torchrun, else describe a single process.

    Args:
        device_pref: "auto" (CUDA when available), "cpu" or "cuda".
    Returns:
        DistInfo. Under torchrun with WORLD_SIZE > 1: NCCL on CUDA (the current device is set
        to LOCAL_RANK) or gloo on CPU, initialised from env:// (MASTER_ADDR/MASTER_PORT). A
        process group the caller initialised already is used as it is.
    """
    if dist.is_available() and dist.is_initialized():  # the caller made the group (e.g. a file:// store)
        local_rank = _env_int("LOCAL_RANK", dist.get_rank())
        device = _resolve_device(device_pref, local_rank)
        return DistInfo(dist.get_world_size() > 1, dist.get_rank(), local_rank, dist.get_world_size(), device)
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    device = _resolve_device(device_pref, local_rank)
    if world_size <= 1:
        return DistInfo(False, 0, 0, 1, device)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(f"WORLD_SIZE={world_size} but {name} is not set; launch with torchrun")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size)
    return DistInfo(True, rank, local_rank, world_size, device)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return get_rank() == 0


def print0(*args, **kwargs) -> None:
    """`print` on rank 0 only (other ranks stay quiet; their errors still reach stderr)."""
    if is_main():
        print(*args, **kwargs)


def barrier() -> None:
    if is_dist():
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group, after freeing what still refers to it.

    Call it once the DDP wrappers are released (train.py: after ``train`` returned). A DDP module
    (its reducer holds the group and gloo work objects) that outlives ``destroy_process_group``
    and is only freed at interpreter exit made a 2-rank gloo run abort now and then at exit
    ("terminate called without an active exception", SIGABRT, after everything was saved): about
    1 run in 20 either way, with or without a NaN stop; 0 in 120 once the wrapper was released
    and garbage-collected before the group was destroyed. ``gc.collect`` frees such wrappers
    still held in reference cycles (e.g. by a traceback) first.
    """
    if is_dist():
        gc.collect()
        dist.destroy_process_group()


def _comm_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo works on CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over all ranks, as a new tensor on `t`'s device; `t` itself is unchanged.

    Single process: a copy of `t`. Integer tensors (confusion matrices) stay exact.
    """
    out = t.detach().clone()
    if not is_dist():
        return out
    work = out.to(_comm_device())
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(t.device)


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on some rank (collective)."""
    return float(all_reduce_sum(torch.tensor([float(flag)]))) > 0


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 the tensors of all ranks, in rank order; first dims may differ.

    Args:
        t: (n_r, ...) on each rank; trailing dims and dtype must agree across ranks.
    Returns:
        (sum_r n_r, ...) on `t`'s device, identical on every rank.
    """
    if not is_dist():
        return t.detach().clone()
    device = _comm_device()
    world = get_world_size()
    size = torch.tensor([t.shape[0]], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s.item()) for s in sizes]
    # all_gather needs equal shapes: pad every rank's tensor to the largest first dim.
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=device)
    padded[: t.shape[0]] = t.detach().to(device)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)]).to(t.device)


def all_gather_object(obj) -> list:
    """Python objects of every rank, in rank order (e.g. per-rank RNG states for a checkpoint)."""
    if not is_dist():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """`obj` of rank `src` on every rank (e.g. the resume decision, so all ranks agree)."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank `src`'s buffers (e.g. BatchNorm running statistics) into `module` on every rank,
    in place. DDP broadcasts them at the start of each forward, so after the last training step
    they differ between ranks; call this before evaluating or saving."""
    if not is_dist():
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, src=src)
