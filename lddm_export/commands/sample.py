"""`lddm-export sample`: draw samples from a bundle with a backend, write .npy or .jsonl.

    lddm-export sample --bundle DIR --backend ort --steps 8 --num 1000 --seed 0 --out samples.npy

.npy holds int64 token ids [K, L]; .jsonl holds one {"ids": [...], "text": ...} object per
sample (text is null for synthetic data such as sawtooth). Batch b of the run uses seed + b.
SEQ bundles run a latent chain of --latent-steps steps first; it defaults to --steps.
The file is written to a temporary name and renamed at the end: an interrupted run leaves
nothing behind.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import click
import numpy as np

from runtimes.errors import LddmError, ShapeMismatch

SUFFIXES = (".npy", ".jsonl")


def check_positive(name: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise LddmError(f"{name} must be a positive integer, got {value}; pass {name} 1 or more")


def check_out(out: Path) -> None:
    """The output's suffix is known and its directory exists and is writable."""
    if out.suffix not in SUFFIXES:
        raise LddmError(f"--out {out} has the suffix {out.suffix or '(none)'!r}; use one of {', '.join(SUFFIXES)}")
    parent = out.parent
    if not parent.is_dir():
        raise LddmError(f"the directory of --out {out} does not exist; create {parent} first")
    try:  # a real probe: os.access says yes to root on read-only mounts
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{out.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise LddmError(f"the directory of --out {out} is not writable ({e.strerror}); choose another --out") from None


def write_atomic(out: Path, tokens: np.ndarray, texts: list[str | None]) -> None:
    """Write .npy (int64 [K, L]) or .jsonl (ids and text per line) via a temp file + rename."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            if out.suffix == ".npy":
                np.save(f, tokens.astype(np.int64))
            else:
                for ids, text in zip(tokens.tolist(), texts):
                    f.write((json.dumps({"ids": ids, "text": text}) + "\n").encode())
        os.replace(tmp, out)
    except OSError as e:
        raise LddmError(f"cannot write --out {out} ({e.strerror}); choose another --out") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


@click.command("sample")
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(path_type=Path), help="bundle directory")
@click.option("--backend", default="ort", show_default=True, help="torch, ort, ort-trt or trt")
@click.option("--precision", default="fp32", show_default=True, help="fp32 or fp16")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N")
@click.option("--steps", required=True, type=int, help="token steps T_x (fuji: also latent steps)")
@click.option("--latent-steps", type=int, default=None, help="seq only: latent steps T_y [default: --steps]")
@click.option("--num", required=True, type=int, help="number of samples K")
@click.option("--batch-size", type=int, default=None, help="samples per call [default: min(K, profile max)]")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of batch 0 (batch b uses seed + b)")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="output .npy or .jsonl")
@click.option("--ckpt", type=click.Path(path_type=Path), default=None,
              help="torch backend: the bundle's model.pt, when not at the path the manifest records")
@click.option("--float32-draws", is_flag=True, help="categorical draws in float32 instead of float64")
@click.option("--cache", is_flag=True, help="mdlm: reuse log_probs when the tokens did not change")
@click.option("--cuda-graph/--no-cuda-graph", default=None, help="torch/trt on CUDA: replay CUDA graphs")
@click.option("--compile", "compile_", is_flag=True,
              help="torch.compile the sampler's token step (and the torch backend's modules)")
@click.option("--threads", type=int, default=None, help="ort on the CPU: intra-op threads per graph")
def command(bundle_dir, backend, precision, device, steps, latent_steps, num, batch_size, seed, out, ckpt,
            float32_draws, cache, cuda_graph, compile_, threads):
    """Sample token ids (and text) from a bundle."""
    from tqdm import tqdm

    from runtimes.backends import check_choice, make_runners
    from runtimes.bundle import Bundle
    from runtimes.samplers import GRAPHS, Sampler, sample_batches
    from runtimes.schedules import latent_steps_for
    from runtimes.tokenizer import TextDecoder

    for name, value in (("--steps", steps), ("--num", num), ("--batch-size", batch_size),
                        ("--latent-steps", latent_steps), ("--threads", threads)):
        check_positive(name, value)
    check_out(out)
    check_choice(backend, precision, device)
    bundle = Bundle.open(bundle_dir)
    if latent_steps is not None and bundle.variant != "seq":
        raise LddmError(f"--latent-steps applies to seq bundles only, and {bundle_dir} is {bundle.variant}; drop it")
    latent_steps = latent_steps_for(bundle.variant, steps, latent_steps)
    max_batch = bundle.manifest["batch_profile"]["max"]
    batch_size = batch_size or min(num, max_batch)
    if batch_size > max_batch:
        raise ShapeMismatch(f"--batch-size {batch_size} is above the bundle's batch profile maximum {max_batch}; "
                            f"use --batch-size <= {max_batch} or rebuild with a larger --batch MIN,OPT,MAX")
    decoder = TextDecoder(bundle.manifest["tokenizer"])
    runners = make_runners(bundle, backend, precision, device, ckpt=ckpt,
                           graphs=list(GRAPHS[bundle.variant]), cuda_graph=cuda_graph, threads=threads,
                           compile=compile_ and backend == "torch")
    for runner in runners.values():
        runner.activate()
    sampler = Sampler.from_bundle(bundle, runners, float64_draws=not float32_draws, cache=cache, compile=compile_)
    n_batches = -(-num // batch_size)
    with tqdm(total=n_batches * (steps + (latent_steps or 0)), desc=f"sample {bundle.variant} ({backend})",
              unit="step", leave=False) as bar:
        result = sample_batches(sampler, seed, num, batch_size, steps, latent_steps,
                                callback=lambda b, step: bar.update(1))
    for runner in runners.values():
        runner.deactivate()
    tokens = result.tokens.numpy()
    write_atomic(out, tokens, decoder.decode(tokens) if out.suffix == ".jsonl" else [])
    click.echo(f"wrote {len(tokens)} samples of {tokens.shape[1]} tokens to {out}", err=True)
