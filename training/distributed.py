"""Multi-process training with torchrun: which process this is, and the process group.

    torchrun --nproc-per-node 2 $(which lddm-train) --variant mdlm --batch-size 64 ...

torchrun starts one process per rank and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; lddm-train reads them here. The run is data-parallel with PyTorch's
DistributedDataParallel (training.trainer): --batch-size is the global batch, each rank draws
batch / world samples from its own generator (seeded from --seed and its rank), DDP averages the
gradients, and rank 0 evaluates and writes the checkpoint and the resume file. Backends: NCCL on
GPUs (each rank on cuda:LOCAL_RANK), gloo on CPUs.

Multi-node (every node runs the same command; the rendezvous endpoint is node 0's address):

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST0:29500 \\
        --rdzv-id lddm-run-1 $(which lddm-train) ... --out /shared/model.pt

--out (and --resume) must then be on storage that every node sees.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed

from training.config import ConfigError

# A prime far from small seeds, so that rank r's stream (seed + r * RANK_STRIDE) never meets
# another run's seed + r'.
RANK_STRIDE = 1_000_003


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job."""

    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def seed(self, seed: int, step: int = 0) -> int:
        """The seed of this rank's generator; a resumed run re-derives it at its step."""
        return seed + self.rank * RANK_STRIDE + step * RANK_STRIDE * self.world


def from_env(env: dict | None = None) -> Dist | None:
    """The torchrun environment, or None for a plain single-process run (WORLD_SIZE unset or 1).

    Raises:
        ConfigError: RANK, WORLD_SIZE or LOCAL_RANK malformed or inconsistent.
    """
    env = os.environ if env is None else env
    if env.get("WORLD_SIZE", "1") == "1":
        return None
    try:
        rank, world, local = (int(env[key]) for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except (KeyError, ValueError):
        raise ConfigError(f"a distributed run needs integer RANK, WORLD_SIZE and LOCAL_RANK (torchrun sets them), "
                          f"got {[env.get(k) for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')]}; "
                          f"start lddm-train with torchrun") from None
    if not (world >= 2 and 0 <= rank < world and local >= 0):
        raise ConfigError(f"RANK {rank} and WORLD_SIZE {world} are inconsistent; start lddm-train with torchrun")
    return Dist(rank, world, local)


def init(dist: Dist, device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on the CPU); returns this rank's device."""
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=dist.rank,
                                         world_size=dist.world)
    return device


def shutdown() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
