"""Data-parallel training over several processes: torch.distributed and DistributedDataParallel.

A run trains on the devices that ``trainer.accelerator`` / ``trainer.devices`` name. With
more than one it is data parallel (DDP): one process per device, each holding a replica of
the model and a shard of every batch, the gradients all-reduced (averaged) in backward.
The processes come from one of three places:

- ``msr-train trainer.devices=[0,1]`` (or ``trainer.accelerator=cpu trainer.devices=2``)
  starts them itself with ``torch.multiprocessing`` and waits for them;
- ``torchrun --nproc-per-node=N -m msr_train.cli ...`` starts them and sets RANK,
  WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT: each process joins that group;
- under SLURM through Hydra's submitit launcher (``hydra.launcher.tasks_per_node=N``)
  each task joins the group that ``submitit.helpers.TorchDistributedEnvironment`` describes.

Conventions (the same whichever started the processes):

- ``batch_size`` is the global batch: each of W processes takes batch_size / W examples
  of every batch, the same examples a single process would see in that step, so the
  learning rate, its batch-size scaling and the logged examples_seen do not depend on W.
- Rank 0 alone writes logs, metrics, checkpoints and the summary, into the one Hydra
  output dir of the run; the other ranks only train.
- Method hooks (ZMG, AGC, BNP preconditioning) run after backward, on the all-reduced
  gradients, identically on every rank, so the replicas stay equal.
- Per-sample random draws (MSR's noise) are drawn for the global batch on every rank from
  the same seed and sliced to the rank's examples (``rand_per_sample``): W processes draw
  exactly what one process would, and the replicas' generators stay in step.
- BatchNorm normalises with each rank's own shard statistics unless ``method.sync_bn``
  (SyncBatchNorm, CUDA only); running statistics (BN's, BNP's) are broadcast from rank 0
  at every forward (DDP's ``broadcast_buffers``), so BNP preconditions with rank 0's
  shard's running statistics on every rank.
- CPU processes use the gloo backend, CUDA processes NCCL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .entry import STOP_SIGNALS, interrupted_outside_the_loop
from .errors import ConfigError, RunFailed


@dataclass(frozen=True)
class Context:
    """Where this process stands in the run: rank ``rank`` of ``world_size``."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world_size > 1

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over all processes (a new tensor; ``t`` itself on a single process)."""
        if not self.parallel:
            return t
        t = t.clone()
        dist.all_reduce(t)
        return t

    def broadcast_buffers(self, model: torch.nn.Module) -> None:
        """Make every replica's buffers (running statistics) rank 0's."""
        if self.parallel:
            for b in model.buffers():
                dist.broadcast(b, 0)


def rand_per_sample(shape: tuple[int, ...], sample_dim: int, *, low: float = 0.0, high: float = 1.0, device=None,
                    dtype=None) -> torch.Tensor:
    """U(low, high) of ``shape`` for this process's examples, the examples of dim
    ``sample_dim``. In a process group of W it draws the global batch's values (W times as
    many examples) and keeps this rank's slice, so that the draws equal a single process's
    and every rank's generator advances alike. ``uniform_`` takes the bounds as they are
    (an affine map of ``torch.rand`` would convert each Python number to a tensor: four
    operators each, which add up at batch 1)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return torch.empty(shape, device=device, dtype=dtype).uniform_(low, high)
    world, rank, n = dist.get_world_size(), dist.get_rank(), shape[sample_dim]
    full = list(shape)
    full[sample_dim] = n * world
    return torch.empty(full, device=device, dtype=dtype).uniform_(low, high).narrow(sample_dim, rank * n, n)


def launched_group() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) of a group that torchrun or submitit started, or None.
    Under a SLURM job with several tasks (Hydra's submitit launcher), submitit's helper
    exports the torch.distributed variables first."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "RANK" not in os.environ:
        try:
            from submitit.helpers import TorchDistributedEnvironment
        except ImportError:
            raise ConfigError("this SLURM job runs several tasks, but torch.distributed is not set up: "
                              "launch through hydra/launcher=submitit_slurm (pip install "
                              "'msr-train[launchers]') or torchrun") from None
        TorchDistributedEnvironment().export()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))


@contextlib.contextmanager
def process_group(device: torch.device, rank: int, world_size: int):
    """This process's membership of the run's process group, as a Context. On the way out
    the group is torn down; after a run that ended normally only once every rank is done
    with its collectives: a rank that tore the group down while another's last operation
    was in flight made that one abort at exit (gloo: "terminate called without an active
    exception", SIGABRT after a completed run)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                            device_id=device if device.type == "cuda" else None)
    try:
        yield Context(rank, world_size)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(index: int, fn, devices: list[torch.device], port: int, args: tuple) -> None:
    # Out of the terminal's process group: a Ctrl-C reaches the parent alone, which
    # forwards it once, so kill -INT <parent> and Ctrl-C act alike.
    os.setpgrp()
    # A second stop signal (the loop's StopSignal puts these back after the first) stops
    # the worker at once as Ctrl-C does, writing its summary, instead of killing it unsaid.
    for sig in STOP_SIGNALS:
        signal.signal(sig, interrupted_outside_the_loop)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        with process_group(devices[index], index, len(devices)) as ctx:
            fn(*args, device=devices[index], ctx=ctx)
    finally:  # its part is done or failed: a signal now (the parent stopping it) just ends it
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)


def spawn(fn, devices: list[torch.device], args: tuple) -> None:
    """Run ``fn(*args, device=, ctx=)`` in one new process per device and wait for them.
    SIGTERM, SIGINT (Ctrl-C), SIGUSR1 and SIGUSR2 sent to this process are forwarded to the workers, which
    checkpoint and exit while this process waits; a second one stops them at once, each
    writing its summary (status interrupted). A worker's ConfigError or RunFailed comes back as one; a
    worker that dies stops the others and ends in a RunFailed naming its rank and exit code."""
    import torch.multiprocessing as mp

    context = mp.start_processes(_worker, args=(fn, devices, free_port(), args), nprocs=len(devices),
                                 join=False, start_method="spawn")

    forwarded = set()

    def forward(signum, frame):
        forwarded.add(signal.Signals(signum).name)
        for p in context.processes:
            if p.is_alive():
                os.kill(p.pid, signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)}
    try:
        while not context.join():
            pass
    except mp.ProcessRaisedException as e:
        message = str(e).strip().splitlines()[-1]
        for error in (ConfigError, RunFailed):
            if message.startswith(f"{error.__module__}.{error.__name__}: "):
                raise error(message.split(": ", 1)[1]) from None
        raise
    except mp.ProcessExitedException as e:
        if e.signal_name in forwarded:  # a second signal reached a worker that had done its part
            raise KeyboardInterrupt(e.signal_name) from None
        how = f"signal {e.signal_name}" if e.signal_name else f"exit code {e.exit_code}"
        raise RunFailed(f"process {e.error_index} of {len(devices)} (pid {e.error_pid}) died with {how}; the others were "
                        "stopped. The last checkpoint is intact: resume the run (same settings, same output dir) to continue "
                        "from it.") from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
