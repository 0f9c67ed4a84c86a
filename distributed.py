"""Distributed training: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; without them, one process.

Both trainers call `setup_distributed` (through runs.run_training) and see a `Distributed`
whatever the launch: its collectives are no-ops in a single process, so the training loops
read the same either way.
"""
import contextlib
import os
from dataclasses import dataclass

import torch

from utils import pick_device


@dataclass
class Distributed:
    """Where this process stands in a (possibly one-process) job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = None  # this process's device (set by setup_distributed)

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        """Rank 0 alone writes checkpoints, grids, metrics and progress bars."""
        return self.rank == 0

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()

    def sum(self, tensor):
        """Sum a tensor over all processes (a no-op for one)."""
        if self.enabled:
            tensor = tensor.clone()
            torch.distributed.all_reduce(tensor)
        return tensor

    def mean(self, tensor):
        """Average a tensor over all processes (a no-op for one)."""
        return self.sum(tensor) / self.world_size if self.enabled else tensor

    def any(self, flag):
        """True on every rank when `flag` is true on any rank (a collective: all must call it)."""
        if not self.enabled:
            return flag
        tensor = torch.tensor([float(flag)], device=self.device)
        torch.distributed.all_reduce(tensor)
        return bool(tensor.item())

    def no_sync(self, *ddp_modules, last):
        """DDP's no_sync on every micro-batch but a step's last: one all-reduce per step."""
        stack = contextlib.ExitStack()
        if self.enabled and not last:
            for module in ddp_modules:
                stack.enter_context(module.no_sync())
        return stack

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (e.g. writes a dataset or cache), the others after it."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def close(self):
        if self.enabled:
            torch.distributed.destroy_process_group()


def wrap_ddp(dist, device, *modules):
    """Each module in DistributedDataParallel when distributed, else the module itself."""
    if not dist.enabled:
        return modules
    device_ids = [device.index] if device.type == "cuda" else None
    return tuple(torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
                 for module in modules)


def setup_distributed(device_name):
    """(Distributed, device): joins the process group when launched by torchrun.

    NCCL between CUDA devices (one per local rank), gloo on the CPU.
    """
    if torch.cuda.is_available():  # TF32 tensor-core matmuls and convolutions (Ampere and later)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        info = Distributed(device=pick_device(device_name))
        return info, info.device
    info = Distributed(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]),
                       int(os.environ["WORLD_SIZE"]))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    info.device = device
    return info, device
