"""torchrun-compatible process-group setup; a single process is simply world size 1."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from source.config import ConfigError, first_line


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_size_from_env() -> int:
    """The world size torchrun announces, known before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank_from_env() -> int:
    """This process's rank as torchrun announces it (0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


def record_for_launcher(message: str) -> None:
    """Leaves this worker's one-line message where torchrun's agent reads a failed worker's reason (the file
    ``TORCHELASTIC_ERROR_FILE`` names, in the JSON torch's ErrorHandler writes). The agent stops the other workers
    as soon as one fails, possibly before rank 0 has printed what every rank met; source.training.launch prints the
    recorded line instead. Outside torchrun: nothing."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    record = {"message": {"message": message, "extraInfo": {"timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as file:
            json.dump(record, file)
    except OSError:
        pass  # the line was printed (by rank 0 at least); the file only lets the launcher repeat it


# How long a rank waits in a collective before the job is aborted. NCCL's default is 10 minutes (gloo's 30): rank 0
# alone writes a snapshot (about 1 GB at ImageNet 128 px: minutes on a slow network disk), draws the preview grid
# (compiling eval-mode G first when performance.compile is on) and scans the data set first (main_first) while the
# others wait. A real hang is then found after an hour instead of ten minutes.
COLLECTIVE_TIMEOUT = timedelta(minutes=60)


def init_world(device: str = "auto") -> World:
    """Join the process group torchrun prepared (NCCL on GPU, gloo on CPU) and pick this rank's device."""
    size, rank = world_size_from_env(), rank_from_env()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = _resolve_device(device, local_rank)
    if size > 1 and not dist.is_initialized():
        cuda = resolved.type == "cuda"
        if cuda:
            torch.cuda.set_device(resolved)
        # device_id binds the rank's GPU to the group: NCCL's barriers then need no guess (nor warn about one)
        dist.init_process_group(backend="nccl" if cuda else "gloo", rank=rank, world_size=size,
                                timeout=COLLECTIVE_TIMEOUT, device_id=resolved if cuda else None)
    return World(rank=rank, local_rank=local_rank, size=size, device=resolved)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def ddp_sync(model: nn.Module, enabled: bool):
    """Let DDP all-reduce the gradients of the backwards inside only when ``enabled``: on the last micro-batch
    of a gradient accumulation (no_sync before it). A model without DDP: nothing to do."""
    if isinstance(model, DistributedDataParallel) and not enabled:
        return model.no_sync()
    return nullcontext()


def shutdown_world(finished: bool) -> None:
    """Leave the process group. After a run that ``finished`` here, wait for the other ranks first: a rank that
    tears gloo down while another still finishes its last collective can abort that one's process. After a
    failure here, no wait (the others may never arrive); a rank that failed after the last collective (its final
    snapshot unwritten) leaves the others' barrier to fail, which changes nothing of their finished run."""
    if not dist.is_initialized():
        return
    try:
        if finished:  # NCCL's barrier is told this rank's GPU (else it guesses one, with a warning)
            dist.barrier(device_ids=[torch.cuda.current_device()] if dist.get_backend() == "nccl" else None)
    except RuntimeError as error:  # gloo: "Connection closed by peer"
        print(f"rank {dist.get_rank()}: another rank left before the final barrier ({first_line(error)})",
              file=sys.stderr)
    finally:
        dist.destroy_process_group()


def _resolve_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", local_rank)
    if resolved.type == "cuda" and resolved.index >= torch.cuda.device_count():
        found = f"only {torch.cuda.device_count()} CUDA GPU(s) are" if torch.cuda.is_available() else "no CUDA GPU is"
        raise ConfigError(f"device: {device} (local rank {local_rank}) but {found} visible here; use device: auto or cpu")
    return resolved


@contextmanager
def main_first(world: World) -> Iterator[None]:
    """Rank 0 runs the block before the others (a download, a cache write), which then find its result."""
    if world.distributed and not world.is_main:
        dist.barrier()
    try:
        yield
    finally:
        if world.distributed and world.is_main:
            dist.barrier()


def all_reduce_mean(values: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        dist.all_reduce(values)
        values /= world.size
    return values


def any_rank(flag: bool, world: World) -> bool:
    """True on every rank when ``flag`` is True on some rank (keeps ranks in lock step on stop requests)."""
    return bool(_reduce_int(int(flag), dist.ReduceOp.MAX, world)) if world.distributed else flag


def sum_over_ranks(count: int, world: World) -> int:
    """``count`` summed over the ranks, on every rank (a collective: every rank must call it)."""
    return _reduce_int(count, dist.ReduceOp.SUM, world) if world.distributed else count


def _reduce_int(value: int, op: dist.ReduceOp, world: World) -> int:
    tensor = torch.tensor([value], dtype=torch.int64, device=world.device if world.device.type == "cuda" else "cpu")
    dist.all_reduce(tensor, op=op)
    return int(tensor.item())


def gather_objects(obj, world: World) -> list:
    """Every rank's ``obj`` (e.g. RNG states), in rank order."""
    if not world.distributed:
        return [obj]
    gathered = [None] * world.size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj, world: World):
    """Rank 0's ``obj`` on every rank."""
    if not world.distributed:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def broadcast_buffers(modules: tuple[torch.nn.Module, ...], world: World) -> None:
    """Rank 0's buffers (BN running statistics, SN u/v) on every rank, one broadcast per dtype.

    Each rank's G updates its BN statistics with its own micro-batches, and DDP re-broadcasts them
    only at the first forward after a synchronized backward; the original copied the main replica's
    persistents to the others after every update, which this reproduces.
    """
    if not world.distributed:
        return
    buffers = [buffer for module in modules for buffer in module.buffers()]
    for dtype in dict.fromkeys(buffer.dtype for buffer in buffers):  # the same order on every rank (a set's is not)
        group = [buffer for buffer in buffers if buffer.dtype == dtype]
        flat = torch.cat([buffer.reshape(-1) for buffer in group])
        dist.broadcast(flat, src=0)
        for buffer, value in zip(group, flat.split([buffer.numel() for buffer in group])):
            buffer.copy_(value.view_as(buffer))


def assert_replicas_identical(modules: list[torch.nn.Module], world: World) -> None:
    """Raise if the ranks' parameters or buffers differ by a single bit (checked whenever a snapshot is written)."""
    if not world.distributed:
        return
    digest = hashlib.sha256()
    for module in modules:
        for tensor in module.state_dict().values():
            digest.update(tensor.detach().cpu().numpy().tobytes())
    digests = gather_objects(digest.hexdigest(), world)
    if len(set(digests)) > 1:
        raise RuntimeError(f"ranks hold different parameters or buffers at this snapshot: {digests}")
