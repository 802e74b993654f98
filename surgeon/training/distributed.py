"""Data-parallel fine-tuning over several processes, with PyTorch's own engine (torch.distributed).

1. The world: torchrun (or `surgeon finetune --nproc N`, which starts torch.distributed.run) sets RANK,
   WORLD_SIZE, LOCAL_RANK and the rendezvous; `join` starts the process group from them (gloo on CPU,
   nccl on CUDA, one GPU per process), or uses the one the caller started.
2. The data: each process reads its shard of a per-epoch permutation (DistributedSampler), so the union
   of the processes' batches at a step is one contiguous slice of the same permutation a single process
   reads; validation is split without padding and its sums are reduced.
3. The model: DistributedDataParallel over the parameters that train in the current freeze phase (it is
   rebuilt when the phase changes), with `find_unused_parameters` only when a forward shows a trainable
   parameter it does not reach; SyncBatchNorm on request (CUDA only: torch's SyncBatchNorm does not run
   on CPU tensors).
Rank 0 alone writes the run folder and shows progress; the others wait for it where it matters.
"""
from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("surgeon")

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def env_rank() -> int:
    """This process's rank as torchrun set it (0 without torchrun); torch-free, for the CLI."""
    return int(os.environ.get("RANK", "0") or 0)


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank among `size` processes, its GPU index on the node, the backend
    (None for a single process) and whether `join` started the group (and `leave` ends it)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None
    owned: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


ONE = World()  # a single process


# -- 1. the world ------------------------------------------------------------------------------------
def join(device: str) -> tuple[World, Any]:
    """(World, torch.device) for this process: one process unless torchrun's variables say WORLD_SIZE > 1
    or the caller already started a process group.

    Raises:
        OptionError: a device that several processes cannot share (an explicit cuda:N, mps).
    """
    import torch
    import torch.distributed as dist

    from surgeon.errors import OptionError

    started = dist.is_available() and dist.is_initialized()
    size = dist.get_world_size() if started else _env_size()
    dev = _shared_device(device, size)
    if size <= 1:
        return ONE, dev
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
        torch.cuda.set_device(dev)
    if not started:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", *ENV_KEYS) if k not in os.environ]
        if missing:
            raise OptionError(f"WORLD_SIZE={size} but {', '.join(missing)} not set: start several processes "
                              f"with torchrun or `surgeon finetune --nproc N`")
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    world = World(rank=dist.get_rank(), size=dist.get_world_size(),
                  local_rank=int(os.environ.get("LOCAL_RANK", "0") or 0), backend=str(dist.get_backend()),
                  owned=not started)
    if world.backend == "nccl" and dev.type != "cuda":
        raise OptionError("The process group uses nccl, which needs CUDA tensors; pass --device cuda")
    log.info("process %d of %d (%s) on %s", world.rank, world.size, world.backend, dev)
    return world, dev


def _env_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def _shared_device(device: str, size: int):
    """The device `size` processes train on (each its own GPU).

    Raises:
        OptionError: a device that several processes cannot share (an explicit cuda:N, mps).
    """
    from surgeon.errors import OptionError
    from surgeon.training.optim import resolve_device

    dev = resolve_device(device)
    if size > 1 and dev.type == "cuda" and ":" in str(device):
        raise OptionError(f"--device {device!r} names one GPU, but {size} processes train; pass --device cuda "
                          f"and each process takes the GPU of its LOCAL_RANK")
    if size > 1 and dev.type not in ("cpu", "cuda"):
        raise OptionError(f"Device {dev.type!r} cannot train in {size} processes; use --device cpu or cuda")
    return dev


def check_launch(nproc: int, data, config) -> None:
    """Refuse, before any process starts, what `nproc` processes could not run: data to split, the device,
    SyncBatchNorm on CPU, more processes than GPUs, a launch from inside torchrun.

    Raises:
        OptionError, DataError: one line naming the problem.
    """
    from surgeon.errors import OptionError

    if _env_size() > 1:
        raise OptionError(f"--nproc starts processes, but this one already runs under torchrun "
                          f"(WORLD_SIZE={_env_size()}); drop --nproc")
    world = World(size=nproc)
    check_split(world, data, "training data")
    dev = _shared_device(config.device, nproc)
    if config.sync_bn:
        check_sync_bn(world, dev)
    if dev.type == "cuda":
        import torch

        if nproc > torch.cuda.device_count():
            raise OptionError(f"--nproc {nproc} on CUDA needs {nproc} GPUs; this machine has "
                              f"{torch.cuda.device_count()}")


def leave(world: World) -> None:
    """End the process group `join` started (a group the caller started stays)."""
    if world.owned:
        import torch.distributed as dist

        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


def reduce_sums(world: World, values: Sequence[float], device) -> list[float]:
    """The sums of `values` over every process (the values themselves in one process)."""
    if not world.distributed:
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# -- 2. the data -------------------------------------------------------------------------------------
def check_split(world: World, data, what: str) -> None:
    """Refuse data that cannot be split over the processes, in one line.

    Raises:
        DataError: fewer samples than processes; a DataLoader not sharded by a DistributedSampler.
    """
    from torch.utils.data import DataLoader, Dataset, DistributedSampler

    from surgeon.errors import DataError

    if not world.distributed:
        return
    if isinstance(data, DataLoader) and not isinstance(data.sampler, DistributedSampler):
        raise DataError(f"The {what} is a DataLoader, which {world.size} processes cannot split; pass its "
                        f"Dataset, or build the DataLoader with a DistributedSampler")
    if not isinstance(data, (Dataset, DataLoader)):
        raise DataError(f"The {what} is a {type(data).__name__}, which {world.size} processes cannot split; "
                        f"pass a Dataset")
    if isinstance(data, Dataset) and len(data) < world.size:
        raise DataError(f"The {what} has {len(data)} samples, fewer than the {world.size} processes; use fewer "
                        f"processes (--nproc) or more data")


def shard(world: World, data, *, seed: int):
    """This process's sampler for the training Dataset `data`: a permutation seeded by `seed`, every
    `size`-th index from `rank`, the tail that does not split evenly dropped (every process takes the
    same number of steps)."""
    from torch.utils.data import DistributedSampler

    return DistributedSampler(data, num_replicas=world.size, rank=world.rank, shuffle=True, seed=seed,
                              drop_last=world.size > 1)


def set_epoch(loader, epoch: int) -> None:
    """Tell a DataLoader's own DistributedSampler (the user's) which epoch it shuffles for."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def eval_shard(world: World, data):
    """This process's part of an evaluation Dataset: every `size`-th sample from `rank`, no padding (the
    reduced sums count every sample once)."""
    from torch.utils.data import Subset

    return data if not world.distributed else Subset(data, range(world.rank, len(data), world.size))


def rank_seed(seed: int, world: World) -> int:
    """A seed per process (dropout, augmentation, loader workers differ between processes); rank 0's is
    `seed`, so one process draws what it always drew."""
    return (seed + world.rank * 0x9E3779B97F4A7C15) % 2**63


# -- 3. the model ------------------------------------------------------------------------------------
def unreached(model, x) -> list[str]:
    """Names of the trainable parameters that a forward on `x` does not reach (the autograd graph of its
    output), run without side effects: random state and buffers (BatchNorm statistics) are restored."""
    import torch

    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        out = model(x)
    with torch.no_grad():
        for b, saved in buffers:
            b.copy_(saved)
    seen, stack, reached = set(), [getattr(out, "grad_fn", None)], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)  # AccumulateGrad: a leaf parameter
        if variable is not None:
            reached.add(id(variable))
        stack.extend(f for f, _ in fn.next_functions)
    return [n for i, n in trainable.items() if i not in reached]


def wrap(model, world: World, device, first_batch) -> Any:
    """`model` in DistributedDataParallel over its trainable parameters (None in one process).

    Raises:
        TrainingError: nothing trains (DDP has nothing to synchronise).
    """
    if not world.distributed:
        return None
    from torch.nn.parallel import DistributedDataParallel

    from surgeon.errors import TrainingError

    if not any(p.requires_grad for p in model.parameters()):
        raise TrainingError("No parameter trains in this phase, so there is nothing to synchronise between "
                            "processes; check --freeze")
    missing = unreached(model, first_batch)
    anywhere = reduce_sums(world, [len(missing)], device)[0] > 0
    if missing:
        log.info("DDP: %d trainable parameters unused in the forward (%s...): find_unused_parameters on",
                 len(missing), missing[0])
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=anywhere)


def check_sync_bn(world: World, device) -> None:
    """Refuse SyncBatchNorm where torch cannot run it.

    Raises:
        OptionError: several processes on CPU (torch's SyncBatchNorm needs GPU tensors).
    """
    from surgeon.errors import OptionError

    if world.distributed and device.type != "cuda":
        raise OptionError("sync_bn (--sync-bn) needs CUDA devices: torch's SyncBatchNorm does not run on CPU; "
                          "drop it, or keep the statistics with --bn-stats frozen")


def sync_batchnorm(model, world: World) -> dict[str, Any]:
    """Replace every BatchNorm by a SyncBatchNorm sharing its parameters and buffers (several processes;
    see `check_sync_bn`). Returns the originals by name, for `swap`."""
    from torch import nn

    if not world.distributed:
        log.info("sync_bn: one process, nothing to synchronise")
        return {}
    synced = {name: nn.SyncBatchNorm.convert_sync_batchnorm(m) for name, m in model.named_modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm)}
    return swap(model, synced)


def swap(model, modules: dict[str, Any]) -> dict[str, Any]:
    """Put `modules` in place by name; returns the modules they replaced."""
    old = {}
    for name, m in modules.items():
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        old[name] = getattr(owner, leaf)
        setattr(owner, leaf, m)
    return old


@contextlib.contextmanager
def swapped(model, modules: dict[str, Any]) -> Iterator[None]:
    """`modules` in place for the duration (the plain BatchNorms while a SyncBatchNorm model is saved)."""
    if not modules:
        yield
        return
    old = swap(model, modules)
    try:
        yield
    finally:
        swap(model, old)


# -- launching ---------------------------------------------------------------------------------------
def without_option(args: Sequence[str], flag: str) -> list[str]:
    """Command-line `args` without `flag` and its value (`--nproc 2` or `--nproc=2`)."""
    out, skip = [], False
    for a in args:
        if skip or a == flag or a.startswith(flag + "="):
            skip = a == flag
            continue
        out.append(a)
    return out


def launch(nproc: int, argv: Sequence[str]) -> dict[int, int]:
    """Run `python -m surgeon.cli *argv` in `nproc` processes on this machine with torch.distributed.run
    (torchrun --standalone --nproc-per-node N). Returns the failed ranks' exit codes (empty: all succeeded).

    CPU processes get an equal share of the cores (OMP_NUM_THREADS) unless it is set.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={nproc}", "--module", "surgeon.cli",
                                         *argv])
    saved = os.environ.get("OMP_NUM_THREADS")
    if saved is None:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    try:
        run(args)
    except ChildFailedError as exc:
        return {f.local_rank: f.exitcode for f in exc.failures.values()}
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
    return {}
