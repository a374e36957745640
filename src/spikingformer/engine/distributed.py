"""Process group set-up for ``torchrun`` (gloo on CPU, NCCL on GPU) and a few collective helpers.

A plain ``spikingformer train`` is a world of one process; under ``torchrun --nproc_per_node=N``
the environment variables it sets (RANK, WORLD_SIZE, LOCAL_RANK, ...) turn on data parallelism.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from spikingformer.cpu_features import usable_cpus


@dataclass(frozen=True)
class Runtime:
    """Where this process runs and which part of the world it is."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` picks CUDA when available, else the CPU; ``cuda`` without an index takes the local
    rank's GPU. An Apple GPU (``mps``) is used only when named: the neuron has no fused kernel there
    (it runs PyTorch's loop), so the CPU's kernels are not passed over unasked."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was requested but no CUDA GPU is available; use --device cpu or auto")
        return torch.device(name if ":" in name else f"cuda:{local_rank}")
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError("--device mps was requested but PyTorch finds no Apple GPU here (MPS needs macOS on "
                             "Apple silicon and a PyTorch built with MPS); use --device cpu or auto")
        return torch.device("mps")
    if name != "cpu":
        raise ValueError(f"unknown device '{name}'; valid: auto, cpu, mps, cuda, cuda:N")
    return torch.device("cpu")


def setup(device: str = "auto") -> Runtime:
    """Initialise the process group when launched by torchrun; otherwise a world of one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    with alike_on_this_machine():  # every process reads the same option and sees this machine's devices
        dev = resolve_device(device, local_rank)
        if dev.type == "mps" and world_size > 1:
            raise ValueError("--device mps under torchrun: PyTorch's process groups (gloo, nccl) do not carry MPS "
                             "tensors; train in one process on the Apple GPU, or use --device cpu under torchrun")
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cpu" and world_size > 1:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
        torch.set_num_threads(max(1, usable_cpus() // local_world))
    return Runtime(dev, rank, world_size, local_rank)


@contextlib.contextmanager
def alike_on_this_machine():
    """Marks the errors the block raises (``err.alike_on_this_machine``) as ones that every process
    of this machine meets alike, since they read the same options and files (a data set not found,
    its layout, a model of another class count): the command prints them once per machine, by
    LOCAL_RANK 0 (another machine of the job may have other files)."""
    try:
        yield
    except Exception as err:
        err.alike_on_this_machine = True
        raise


def alike_everywhere(err: Exception) -> Exception:
    """Marks ``err`` (``err.alike_everywhere``) as one that every process of the job raises alike, at
    the same point, having agreed on it through a collective (a diverged loss, see
    ``trainer.stop_if_diverged``): the command prints it once, by RANK 0. Returns ``err``. (Every
    ``ConfigError`` carries the mark: each process reads the same options.)"""
    err.alike_everywhere = True
    return err


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Sum a tensor over all processes, returned on the tensor's own device (identity in a world of
    one). It travels through the run's device, as NCCL carries CUDA tensors only; in a world of one
    it stays where it is (float64 sums kept on the CPU never meet an Apple GPU, which has no float64)."""
    if runtime.distributed:
        summed = values.to(runtime.device, copy=True)
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        values = summed.to(values.device)
    return values


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()
