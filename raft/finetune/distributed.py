"""The processes of a run: one (`raft run`), or N started by `torchrun` / `accelerate launch`.

accelerate's PartialState reads the launcher's environment (RANK, WORLD_SIZE, ...) and sets up
torch.distributed (NCCL on GPUs, gloo on CPUs). The loop asks this module three things: which share of the
work is this process's (`shard`), what every process produced (`gather`), and what the main process, the only
one that reads and writes the run directory, knows (`broadcast`). On one process each is the identity.
"""

from __future__ import annotations

from pathlib import Path

import torch

from raft.errors import RaftError

_state = None


def state(cpu: bool | None = None):
    """The process state, created on first use. `cpu`: run on CPUs even where CUDA is available (gloo)."""
    global _state
    if _state is None:
        from accelerate import PartialState

        if cpu is None:
            cpu = not torch.cuda.is_available()
        _state = PartialState(cpu=cpu)
    return _state


def world() -> int:
    return state().num_processes


def rank() -> int:
    return state().process_index


def is_main() -> bool:
    return state().is_main_process


def resolve_device(name: str) -> torch.device:
    """The device of `model.device`: auto is this process's accelerator (cuda:<local rank> under a multi-GPU
    launch, else cuda when available, else cpu)."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return state().device if world() > 1 else torch.device("cuda")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RaftError(f"config: model.device '{name}' is not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RaftError(f"config: model.device is '{name}' but CUDA is not available")
    if device.type == "cuda" and world() > 1:
        return state().device  # one GPU per process: the launcher's local rank picks it
    return device


def shard(items: list) -> list:
    """This process's share of `items`: every world()-th one, starting at its rank."""
    return items[rank() :: world()]


def gather(items: list) -> list:
    """Every process's `items` (picklable), concatenated in rank order; the same list on every process."""
    if world() == 1:
        return list(items)
    from accelerate.utils import gather_object

    return [item for part in gather_object([list(items)]) for item in part]  # one list per process


def broadcast(value):
    """The main process's `value`, on every process (it must be picklable)."""
    if world() == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def reduce_sum(values: dict[str, float]) -> dict[str, float]:
    """Each key summed over the processes (every process must pass the same keys, in the same order)."""
    if world() == 1 or not values:
        return dict(values)
    import torch.distributed as dist

    tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return dict(zip(values, tensor.tolist()))


def barrier() -> None:
    if world() > 1:
        state().wait_for_everyone()


def _collective_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo CPU ones
    return state().device if state().device.type == "cuda" else torch.device("cpu")


def finish() -> None:
    """Wait for every process, then close the process group: a clean exit (a process that leaves while a
    peer still talks to it over gloo can take that peer down)."""
    if world() > 1:
        state().wait_for_everyone()
        state().destroy_process_group()


def has_fast_bf16(device: torch.device) -> bool:
    """Whether bf16 matmuls run natively here: a CUDA GPU with bf16, or a CPU with avx512_bf16 or AMX (elsewhere
    bf16 is emulated, slower than float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to tell
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
