"""torchrun data-parallel training on this CPU (gloo): two processes follow one process's loss
trajectory with the same global batch, rank 0 alone writes, and a run resumes across a change
of world size. These start real `torchrun ... lddm-train` processes."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fixtures import tiny_config
from training.config import ConfigError
from training.distributed import Dist, from_env
from training.model import LDDM

BIN = Path(sys.executable).parent
# Tiny sawtooth MDLM: 300 steps take ~10 s a run here. Seed 1 escapes the initial plateau in both
# runs (seed 0 does not in the single process: that is chance, not the world size).
ARGS = ["--variant", "mdlm", "--data", "sawtooth", "--preset", "tiny", "--batch-size", "32", "--lr", "3e-3",
        "--warmup", "20", "--eval-every", "100", "--seed", "1", "--no-progress"]
TRAJECTORY_TOLERANCE = 0.05   # relative, held-out L_x at every evaluation after the first


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lddm_train(out: Path, *extra, world: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [str(BIN / "lddm-train"), *ARGS, *extra, "--out", str(out)]
    if world > 1:
        cmd = [str(BIN / "torchrun"), "--nproc-per-node", str(world), "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), *cmd]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=out.parent)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def heldout_history(path: Path) -> list[float]:
    return [r["heldout_x"] for r in torch.load(path, weights_only=True)["train"]["history"]]


@pytest.mark.skipif(shutil.which("torchrun", path=str(BIN)) is None, reason="torchrun is not installed")
def test_two_gloo_processes_follow_one_process_and_resume_across_world_sizes(tmp_path):
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    lddm_train(one, "--max-steps", "300")
    run = lddm_train(two, "--max-steps", "300", world=2)
    assert "global batch 32 = 2 ranks x 16" in run.stdout
    assert run.stdout.count("wrote ") == 1 and run.stdout.count("step 300:") == 1   # rank 0 alone reports
    a, b = heldout_history(one), heldout_history(two)
    assert len(a) == len(b) == 3 and a[-1] < 0.62 and b[-1] < 0.62   # both learned (ln 2 = 0.693 at the start)
    for x, y in zip(a[1:], b[1:]):
        assert abs(x - y) / x <= TRAJECTORY_TOLERANCE, (a, b)
    assert torch.load(two, weights_only=True)["train"]["world_size"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.pt", "one.pt.resume.pt", "two.pt", "two.pt.resume.pt"]
    # The 2-process run's resume file continues in one process, and back in two.
    resumed = lddm_train(two, "--max-steps", "350", "--resume", str(tmp_path / "two.pt.resume.pt"))
    assert "resumed from" in resumed.stdout and "at step 300" in resumed.stdout
    again = lddm_train(two, "--max-steps", "400", "--resume", str(tmp_path / "two.pt.resume.pt"), world=2)
    assert "at step 350" in again.stdout
    train = torch.load(two, weights_only=True)["train"]
    assert train["steps"] == 400 and train["world_size"] == 2 and heldout_history(two)[-1] < 0.62


def test_the_torchrun_environment_is_read_and_checked():
    assert from_env({}) is None and from_env({"WORLD_SIZE": "1"}) is None
    assert from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == Dist(1, 2, 1)
    with pytest.raises(ConfigError, match="needs integer RANK, WORLD_SIZE and LOCAL_RANK"):
        from_env({"WORLD_SIZE": "2", "RANK": "x", "LOCAL_RANK": "0"})
    with pytest.raises(ConfigError, match="RANK 2 and WORLD_SIZE 2 are inconsistent"):
        from_env({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    ranks = [Dist(r, 2, r) for r in range(2)]
    assert ranks[0].seed(7) == 7 and len({d.seed(7, step) for d in ranks for step in (0, 300)}) == 4


def test_a_global_batch_that_does_not_split_is_refused(tmp_path):
    from training.data import load_data
    from training.trainer import TrainConfig, train

    with pytest.raises(ConfigError, match="--batch-size 33 is the global batch and must split evenly over the 2 ranks"):
        train(tiny_config("mdlm"), TrainConfig(batch_size=33, max_steps=1), load_data("sawtooth", 16),
              tmp_path / "m.pt", dist=Dist(0, 2, 0))


def _rank_weights(rank: int, port: int, results) -> None:
    """One rank: three distributed train steps, then this rank's weights (flattened)."""
    from training import distributed
    from training.data import load_data
    from training.losses import LossOptions
    from training.trainer import TrainConfig, start_run, train_step

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist = Dist(rank, 2, rank)
    device = distributed.init(dist, torch.device("cpu"))
    try:
        cfg = TrainConfig(batch_size=8, max_steps=3, lr=1e-2, warmup=1)
        run = start_run(tiny_config("fuji"), cfg, device)
        run.gen.manual_seed(dist.seed(cfg.seed))
        data = load_data("sawtooth", tiny_config("fuji").seq_len)
        for stage in (1, 1, 2):   # a stage change re-wraps DDP (the encoder freezes)
            run.model.encoder.requires_grad_(stage == 1)
            train_step(run, data, device, cfg, stage, 1.0, LossOptions(), dist)
        results[rank] = torch.cat([p.detach().flatten() for p in run.model.parameters()])
    finally:
        distributed.shutdown()


def test_ranks_hold_the_same_weights_after_each_step():
    """Each rank draws other samples; only DDP's gradient averaging keeps their weights equal."""
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_weights, args=(free_port(), results), nprocs=2, join=True)
        a, b = results[0], results[1]
    assert torch.equal(a, b)
    torch.manual_seed(0)   # start_run's initialisation
    initial = torch.cat([p.detach().flatten() for p in LDDM(tiny_config("fuji")).parameters()])
    assert a.shape == initial.shape and not torch.equal(a, initial)   # they trained
