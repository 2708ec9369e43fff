"""`lddm-export sample`: draw samples from a bundle with a backend, write .npy or .jsonl.

    lddm-export sample --bundle DIR --backend ort --steps 8 --num 1000 --seed 0 --out samples.npy

.npy holds int64 token ids [K, L]; .jsonl holds one {"ids": [...], "text": ...} object per
sample (text is null for synthetic data such as sawtooth). Batch b of the run uses seed + b.

Prompted and infilling generation (text bundles; runtimes/prompts.py): --prompt TEXT clamps the
prompt's tokens at the start, --template TEXT clamps the text around each "____" hole (of
--hole-tokens tokens), --prompts FILE reads one {"prompt": ...} or {"template": ...} per line;
--num samples are drawn per prompt, and each .jsonl line also carries "prompt" (as given) and
"generated" (the decoded generated spans, in order).
SEQ bundles run a latent chain of --latent-steps steps first; it defaults to --steps. With a
prompt, --latent-candidates C runs C latent chains per sample and keeps the latent that best
explains the prompt (runtimes/samplers.py), since SEQ's latent chain does not see the prompt.
Integer options have the ranges of runtimes/options.py (shown by --help), and the job's
memory and length are checked before anything runs. The file is written through
runtimes.fileio.write_atomic: an interrupted run or a full disk leaves nothing behind.
"""
from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np

from lddm_export.commands.numbers import Int
from runtimes.errors import LddmError, ShapeMismatch
from runtimes.fileio import check_input_file, check_target, write_atomic
from runtimes.options import (MAX_BATCH, MAX_LATENT_CANDIDATES, MAX_SAMPLES, MAX_SEED, MAX_STEPS, MAX_THREADS,
                              check_job, steps_per_call)
from runtimes.spec import HEADS

SUFFIXES = (".npy", ".jsonl")


def check_out(out: Path) -> None:
    """The output's suffix is known and it can be written (runtimes.fileio.check_target)."""
    if out.suffix not in SUFFIXES:
        raise LddmError(f"--out {out} has the suffix {out.suffix or '(none)'!r}; use one of {', '.join(SUFFIXES)}")
    check_target(out, "--out")


def write_samples(out: Path, tokens: np.ndarray, texts: list[str | None], prompted: list[dict] | None = None) -> None:
    """Write .npy (int64 [K, L]) or .jsonl (ids and text per line, and each sample's "prompt"
    and "generated" spans when prompted), atomically."""
    def write(f) -> None:
        if out.suffix == ".npy":
            np.save(f, tokens.astype(np.int64))
        else:
            for i, (ids, text) in enumerate(zip(tokens.tolist(), texts)):
                f.write((json.dumps({"ids": ids, "text": text, **(prompted[i] if prompted else {})}) + "\n").encode())

    write_atomic(out, write, "--out")


def read_prompts(bundle, prompt, template, prompts_file, hole_tokens: int):
    """The prompts of --prompt, --template or --prompts (runtimes.prompts.Prompt), or None."""
    from runtimes.prompts import PromptEncoder

    if prompt is None and template is None and prompts_file is None:
        return None
    encoder = PromptEncoder(bundle.manifest["tokenizer"], bundle.shapes["L"], bundle.shapes["V"] - 1, hole_tokens)
    if prompt is not None:
        return [encoder.prompt(prompt)]
    if template is not None:
        return [encoder.template(template)]
    return encoder.file(prompts_file)


def generated_spans(ids: list[int], known: tuple[int, ...]) -> list[list[int]]:
    """The ids of each maximal run of generated (FREE) positions, in order."""
    from runtimes.prompts import FREE

    spans: list[list[int]] = []
    for i, (token, k) in enumerate(zip(ids, known)):
        if k == FREE:
            if i == 0 or known[i - 1] != FREE:
                spans.append([])
            spans[-1].append(token)
    return spans


@click.command("sample")
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(path_type=Path), help="bundle directory")
@click.option("--backend", default="ort", show_default=True, help="torch, ort, ort-trt or trt")
@click.option("--precision", default="fp32", show_default=True, help="fp32 or fp16")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N")
@click.option("--steps", required=True, type=Int(1, MAX_STEPS), help="token steps T_x (fuji: also latent steps)")
@click.option("--latent-steps", type=Int(1, MAX_STEPS), default=None,
              help="seq only: latent steps T_y [default: --steps]")
@click.option("--num", required=True, type=Int(1, MAX_SAMPLES), help="number of samples K")
@click.option("--batch-size", type=Int(1, MAX_BATCH), default=None,
              help="samples per call [default: min(K, profile max)]")
@click.option("--seed", type=Int(0, MAX_SEED), default=0, show_default=True,
              help="seed of batch 0 (batch b uses seed + b)")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="output .npy or .jsonl")
@click.option("--ckpt", type=click.Path(path_type=Path), default=None,
              help="torch backend: the bundle's model.pt, when not at the path the manifest records")
@click.option("--float32-draws", is_flag=True, help="categorical draws in float32 instead of float64")
@click.option("--cache", is_flag=True, help="mdlm: reuse log_probs when the tokens did not change")
@click.option("--cuda-graph/--no-cuda-graph", default=None, help="torch/trt on CUDA: replay CUDA graphs")
@click.option("--compile", "compile_", is_flag=True,
              help="torch.compile the sampler's token step (and the torch backend's modules)")
@click.option("--threads", type=Int(1, MAX_THREADS), default=None, help="ort on the CPU: intra-op threads per graph")
@click.option("--head", type=click.Choice(HEADS), default="sparse", show_default=True,
              help="log-probs only where tokens unmask (sparse), or at every position (dense, the reference form)")
@click.option("--prompt", default=None, help="text bundles: continue this text (its tokens are clamped)")
@click.option("--template", default=None, help="text bundles: fill each '____' hole of this text")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), default=None,
              help='text bundles: a JSON-lines file of {"prompt": ...} or {"template": ...}; --num samples each')
@click.option("--hole-tokens", type=Int(1, MAX_STEPS), default=16, show_default=True,
              help="tokens generated for each hole of a template")
@click.option("--latent-candidates", type=Int(1, MAX_LATENT_CANDIDATES), default=1, show_default=True,
              help="seq with prompts: latent chains per sample, the one that best explains the prompt kept")
def command(bundle_dir, backend, precision, device, steps, latent_steps, num, batch_size, seed, out, ckpt,
            float32_draws, cache, cuda_graph, compile_, threads, head, prompt, template, prompts_file, hole_tokens,
            latent_candidates):
    """Sample token ids (and text) from a bundle."""
    import torch

    from runtimes.backends import check_choice, make_runners
    from runtimes.bundle import Bundle
    from runtimes.progress import progress
    from runtimes.samplers import Sampler, sample_batches, sampler_graphs
    from runtimes.schedules import latent_steps_for
    from runtimes.tokenizer import TextDecoder
    from training.checkpoint import load_reference_graphs

    check_out(out)
    if ckpt is not None:
        check_input_file(ckpt, "--ckpt", "pass the bundle's model.pt")
    if sum(v is not None for v in (prompt, template, prompts_file)) > 1:
        raise LddmError("--prompt, --template and --prompts each give the prompts; pass one of them")
    if prompts_file is not None:
        check_input_file(prompts_file, "--prompts", "pass a JSON-lines file of prompts")
    check_choice(backend, precision, device)
    bundle = Bundle.open(bundle_dir)
    if latent_steps is not None and bundle.variant != "seq":
        raise LddmError(f"--latent-steps applies to seq bundles only, and {bundle_dir} is {bundle.variant}; drop it")
    latent_steps = latent_steps_for(bundle.variant, steps, latent_steps)
    prompts = read_prompts(bundle, prompt, template, prompts_file, hole_tokens)
    if latent_candidates > 1 and bundle.variant != "seq":
        raise LddmError(f"--latent-candidates applies to seq bundles only, and {bundle_dir} is {bundle.variant}; drop it")
    if latent_candidates > 1 and prompts is None:
        raise LddmError("--latent-candidates keeps the latent that best explains the prompt; pass --prompt, "
                        "--template or --prompts, or drop it")
    per_sample = None if prompts is None else [p for p in prompts for _ in range(num)]   # --num each
    known = None if per_sample is None else torch.tensor([p.known for p in per_sample], dtype=torch.int64)
    num = num if per_sample is None else len(per_sample)
    max_batch = bundle.manifest["batch_profile"]["max"]
    batch_size = batch_size or min(num, max_batch)
    if batch_size > max_batch:
        raise ShapeMismatch(f"--batch-size {batch_size} is above the bundle's batch profile maximum {max_batch}; "
                            f"use --batch-size <= {max_batch} or rebuild with a larger --batch MIN,OPT,MAX")
    check_job(num, batch_size, steps, latent_steps, bundle.shapes, latent_candidates)
    decoder = TextDecoder(bundle.manifest["tokenizer"])
    runners = make_runners(bundle, backend, precision, device, ckpt=ckpt,
                           graphs=list(sampler_graphs(bundle.variant, head)), cuda_graph=cuda_graph, threads=threads,
                           compile=compile_ and backend == "torch", reference=load_reference_graphs)
    for runner in runners.values():
        runner.activate()
    sampler = Sampler.from_bundle(bundle, runners, float64_draws=not float32_draws, head=head, cache=cache,
                                  compile=compile_)
    n_batches = -(-num // batch_size)
    with progress(n_batches * steps_per_call(steps, latent_steps, latent_candidates),
                  f"sample {bundle.variant} ({backend})") as bar:
        result = sample_batches(sampler, seed, num, steps, latent_steps, batch_size,
                                callback=lambda b, step: bar.update(1), known=known, latent_candidates=latent_candidates)
    for runner in runners.values():
        runner.deactivate()
    tokens = result.tokens.numpy()
    prompted = None
    if per_sample is not None and out.suffix == ".jsonl":
        prompted = [{"prompt": p.text, "generated": decoder.decode(generated_spans(ids, p.known))}
                    for ids, p in zip(tokens.tolist(), per_sample)]
    write_samples(out, tokens, decoder.decode(tokens) if out.suffix == ".jsonl" else [], prompted)
    click.echo(f"wrote {len(tokens)} samples of {tokens.shape[1]} tokens to {out}", err=True)
