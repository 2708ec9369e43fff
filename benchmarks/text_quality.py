"""Generative perplexity and unigram entropy vs token steps for the text examples (MDLM, FUJI, SEQ).

For every model, number of token steps T and sampling seed, draw --num samples with the
reference sampler (training.sampling.sample; batch b of seed s uses s + b) and score them
under the shipped AR model (training.metrics.ar_perplexity); report the mean and std over
the seeds. Rows:
- mdlm, fuji;
- seq: --seq-latent-steps latent steps (stated in the output); seq_ty=T: as many latent
  steps as token steps;
- seq_prompt: the prompt-aware SEQ (examples/text-seq-prompt.pt: text-seq.pt with a latent
  denoiser that also reads clamped tokens), unprompted, at --seq-prompt-steps: whether a latent
  denoiser trained on random clamps keeps the unprompted quality;
- fuji_fresh_latent, seq_fresh_latent (the ablation, at --ablation-steps): every call of
  the token denoiser sees fresh noise instead of the sampled latent. FUJI's latent input is
  alpha(t) y + sigma(t) eps with y a fresh random point of the encoder's latent sphere (the
  statistics of y_t at t, no information); SEQ's token denoiser sees a fresh sphere point.
  The gap to the plain row is what the latent channel carries.
Reference points from the same AR model: its perplexity on the held-out tail of the corpus
(the last 10%, never trained on), on its own ancestral samples, and the unigram entropy of
held-out blocks.

Sampling and scoring are separate: samples are cached as .npy under --cache (one file per
row, T and seed), so runs can be split across processes (--rows) and resumed; the scoring
pass (--score) needs every cell and writes results/text.json, text_run.json and the plots.

    python benchmarks/text_quality.py --rows mdlm,fuji          # one process
    python benchmarks/text_quality.py --rows seq,seq_ty=T,fuji_fresh_latent,seq_fresh_latent
    python benchmarks/text_quality.py --score                   # results/text.json, text_*.png

One reference-sampler step on 256 samples takes 2.3-4 s of one core at the shipped size, so a
cell of 256 samples at T = 128 costs about 5-8 minutes, and a row's T = 128 cells about 35;
split long rows over processes with --steps and --seeds (each cell is its own seeded file).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from runtimes.fileio import sha256_file
from training.checkpoint import load_checkpoint
from training.data import TextData, decode_ids
from training.metrics import ar_perplexity, unigram_entropy
from training.model import LDDM
from training.sampling import sample, sample_ar
from training.schedules import latent_schedule

ROOT = Path(__file__).resolve().parent.parent
STEPS = (1, 2, 4, 8, 16, 32, 64, 128)
ROWS = ("mdlm", "fuji", "seq", "seq_ty=T", "seq_prompt", "fuji_fresh_latent", "seq_fresh_latent")
MODEL_OF_ROW = {"mdlm": "mdlm", "fuji": "fuji", "seq": "seq", "seq_ty=T": "seq", "seq_prompt": "seq-prompt",
                "fuji_fresh_latent": "fuji", "seq_fresh_latent": "seq"}   # examples/text-<model>.pt


# ----------------------------------------------------------------------------- the ablation

def sphere_points(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Random points on the encoder's latent sphere: each slot has norm sqrt(D)."""
    g = torch.randn(shape, generator=generator)
    return g * math.sqrt(shape[-1]) / g.norm(dim=-1, keepdim=True)


class FreshLatentFuji(nn.Module):
    """FUJI's denoiser with its latent input replaced by fresh noise of y_t's statistics."""

    def __init__(self, denoiser: nn.Module, model: LDDM, generator: torch.Generator):
        super().__init__()
        self.denoiser, self.schedule, self.generator = denoiser, latent_schedule(model.cfg), generator

    def forward(self, x_t, y_t, t):
        a, s = (v.float()[:, None, None] for v in self.schedule.alpha_sigma(t.double()))
        fake = a * sphere_points(tuple(y_t.shape), self.generator) + s * torch.randn(y_t.shape, generator=self.generator)
        return self.denoiser(x_t, fake, t)


class FreshLatentSeq(nn.Module):
    """SEQ's token denoiser fed a fresh sphere point instead of the sampled clean latent."""

    def __init__(self, token_denoiser: nn.Module, generator: torch.Generator):
        super().__init__()
        self.token_denoiser, self.generator = token_denoiser, generator

    def forward(self, x_t, y0, t):
        return self.token_denoiser(x_t, sphere_points(tuple(y0.shape), self.generator), t)


def with_fresh_latent(model: LDDM, seed: int) -> LDDM:
    """The ablation's model: the same weights, the latent input of the token network replaced."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    if model.cfg.variant == "fuji":
        model.denoiser = FreshLatentFuji(model.denoiser, model, generator)
    else:
        model.token_denoiser = FreshLatentSeq(model.token_denoiser, generator)
    return model


# ----------------------------------------------------------------------------- sampling

def row_steps(row: str, args) -> tuple[int, ...]:
    if row.endswith("fresh_latent"):
        return tuple(args.ablation_steps)
    if row == "seq_prompt":
        return tuple(args.seq_prompt_steps)
    if row == "seq_ty=T":  # T = T_y = the seq row's latent steps is the seq row's cell
        return tuple(s for s in args.steps if s != args.seq_latent_steps)
    return tuple(args.steps)


def latent_steps_of(row: str, steps: int, args) -> int | None:
    if not MODEL_OF_ROW[row].startswith("seq"):
        return None
    return steps if row == "seq_ty=T" else args.seq_latent_steps


def cell_path(args, row: str, steps: int, seed: int) -> Path:
    return Path(args.cache) / f"{row}_T{steps}_seed{seed}_n{args.num}.npy"


def draw_row(row: str, args) -> None:
    """Sample every (T, seed) cell of one row that is not cached yet."""
    path = Path(args.examples) / f"text-{MODEL_OF_ROW[row]}.pt"
    for steps in row_steps(row, args):
        for seed in args.seeds:
            out = cell_path(args, row, steps, seed)
            if out.exists():
                continue
            model, _ = load_checkpoint(path)
            if row.endswith("fresh_latent"):
                model = with_fresh_latent(model, seed)
            start = time.perf_counter()
            tokens = sample(model, seed, args.num, steps, latent_steps_of(row, steps, args),
                            args.batch_size).tokens
            tmp = out.with_name(out.name + ".tmp.npy")
            np.save(tmp, tokens.numpy())
            tmp.replace(out)
            print(f"{row:18s} T={steps:3d} seed {seed}: {time.perf_counter() - start:6.1f} s", flush=True)


# ----------------------------------------------------------------------------- scoring

def latent_information(args, blocks: torch.Tensor) -> dict:
    """Held-out L_x (nats/token) of each model with its encoder's latent and with fresh noise instead.

    The difference is what the latent channel tells the token denoiser about the masked
    tokens; MDLM, which has no latent, is the baseline. Same t, masks and noise for all.
    Also the spread of the encoder's latent over the held-out texts (encoder_latent_std).
    """
    from training.data import HELDOUT_SEED
    from training.losses import LossOptions, compute_loss

    out = {}
    for variant in ("mdlm", "fuji", "seq"):
        row = {}
        for name, fresh in (("heldout_x", False), ("heldout_x_fresh_latent", True)):
            if fresh and variant == "mdlm":
                continue
            model, _ = load_checkpoint(Path(args.examples) / f"text-{variant}.pt")
            model = with_fresh_latent(model, 0) if fresh else model
            g = torch.Generator().manual_seed(HELDOUT_SEED)
            with torch.no_grad():
                losses = [compute_loss(model.eval(), batch, g, stage=2, lambda_y=0.0, opts=LossOptions()).loss_x
                          for batch in blocks.split(args.batch_size)]
            row[name] = float(np.mean(losses))
        if variant != "mdlm":
            with torch.no_grad():  # 0: one latent for every text (collapsed); ~1: as varied as N(0, I)
                row["encoder_latent_std"] = float(model.encoder(blocks).std(dim=0).mean())
        out[variant] = row
        print(f"held-out L_x {variant}: {row}", flush=True)
    return out


def load_cell(args, row: str, steps: int, seed: int) -> torch.Tensor:
    if row == "seq_ty=T" and steps == args.seq_latent_steps:
        row = "seq"
    path = cell_path(args, row, steps, seed)
    if not path.exists():
        raise SystemExit(f"{path} is missing; run this script with --rows {row} first")
    return torch.from_numpy(np.load(path))


def heldout(args, ar_ckpt: dict) -> torch.Tensor:
    """The held-out blocks of the corpus, tokenized exactly as the models were trained."""
    cfg = ar_ckpt["config"]
    data = TextData(f"text:{args.corpus}", cfg["seq_len"], "bpe", cfg["vocab_size"])
    if data.tokenizer["json"] != ar_ckpt["tokenizer"]["json"]:
        raise SystemExit(f"--corpus {args.corpus} does not give the AR model's tokenizer; pass the corpus it was trained on")
    return data.heldout_blocks


def score(args) -> None:
    ar, ar_ckpt = load_checkpoint(Path(args.examples) / "text-ar.pt")
    models = dict.fromkeys([*(MODEL_OF_ROW[row] for row in args.rows), "ar"])
    checkpoints = {m: Path(args.examples) / f"text-{m}.pt" for m in models}
    for variant, path in checkpoints.items():
        if load_checkpoint(path)[1]["tokenizer"]["json"] != ar_ckpt["tokenizer"]["json"]:
            raise SystemExit(f"{path} has another tokenizer than the AR evaluator; train both on one corpus and vocabulary")
    blocks = heldout(args, ar_ckpt)
    ar_tokens = sample_ar(ar, args.seeds[0], args.num, args.batch_size)
    results = {"reference": {"heldout_ppl": ar_perplexity(ar, blocks), "ar_samples_ppl": ar_perplexity(ar, ar_tokens),
                             "data_entropy": unigram_entropy(blocks), "ar_samples_entropy": unigram_entropy(ar_tokens)}}
    print(json.dumps(results["reference"]), flush=True)
    for row in args.rows:
        results[row] = {}
        for steps in row_steps(row, args) + ((args.seq_latent_steps,) if row == "seq_ty=T" else ()):
            cells = [load_cell(args, row, steps, seed) for seed in args.seeds]
            ppl = [ar_perplexity(ar, tokens) for tokens in cells]
            entropy = [unigram_entropy(tokens) for tokens in cells]
            results[row][str(steps)] = {"gen_ppl": float(np.mean(ppl)), "gen_ppl_std": float(np.std(ppl, ddof=1)),
                                        "entropy": float(np.mean(entropy)), "entropy_std": float(np.std(entropy, ddof=1)),
                                        "samples": sum(len(tokens) for tokens in cells)}
            print(f"{row:18s} T={steps:3d}  gen PPL {np.mean(ppl):8.2f} +- {np.std(ppl, ddof=1):6.2f}  "
                  f"entropy {np.mean(entropy):.3f}", flush=True)
        results[row] = dict(sorted(results[row].items(), key=lambda kv: int(kv[0])))
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "text.json").write_text(json.dumps(results, indent=2) + "\n")
    run = {"command": " ".join(["python", "benchmarks/text_quality.py", *sys.argv[1:]]),
           "samples_per_seed": args.num, "seeds": args.seeds,
           "seq_latent_steps": args.seq_latent_steps, "ar_samples": {"num": args.num, "seed": args.seeds[0]},
           "checkpoints": {v: {"path": str(p), "sha256": sha256_file(p)} for v, p in checkpoints.items()},
           "samples": {row: {steps: decode_ids(ar_ckpt["tokenizer"], load_cell(args, row, steps, args.seeds[0])[:3])
                             for steps in (4, 64) if steps in args.steps}
                       for row in ("mdlm", "fuji", "seq")},
           "ar_samples_text": decode_ids(ar_ckpt["tokenizer"], ar_tokens[:3]),
           "latent_information": latent_information(args, blocks)}
    (results_dir / "text_run.json").write_text(json.dumps(run, indent=2) + "\n")
    plot(results, args)
    print(markdown_table(results, args))


def markdown_table(results: dict, args) -> str:
    """Gen PPL (mean ± std over seeds) and entropy per row and T, as a markdown table."""
    lines = ["| model | " + " | ".join(f"T={s}" for s in args.steps) + " |", "|---|" + "---|" * len(args.steps)]
    for row in args.rows:
        cells = [results[row].get(str(s)) for s in args.steps]
        lines.append(f"| {row} | " + " | ".join(
            f"{c['gen_ppl']:.1f} ± {c['gen_ppl_std']:.1f} ({c['entropy']:.2f})" if c else "" for c in cells) + " |")
    return "\n".join(lines)


def plot(results: dict, args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"mdlm": "MDLM", "fuji": "FUJI-LDDM", "seq": f"SEQ-LDDM (T_y = {args.seq_latent_steps})",
              "seq_ty=T": "SEQ-LDDM (T_y = T)",
              "seq_prompt": f"SEQ-LDDM, prompt-aware latent denoiser (T_y = {args.seq_latent_steps})",
              "fuji_fresh_latent": "FUJI, latent = fresh noise",
              "seq_fresh_latent": "SEQ, latent = fresh noise"}
    ref = results["reference"]
    for metric, ylabel, name, refs in (
            ("gen_ppl", "generative perplexity (AR evaluator)", "text_gen_ppl.png",
             [("heldout_ppl", "held-out text"), ("ar_samples_ppl", "AR samples")]),
            ("entropy", "unigram entropy (nats)", "text_entropy.png", [("data_entropy", "held-out text")])):
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for row in args.rows:
            steps = [int(s) for s in results[row]]
            style = dict(ls="--", marker="x") if row.endswith("fresh_latent") else dict(marker="o")
            ax.errorbar(steps, [results[row][str(s)][metric] for s in steps],
                        yerr=[results[row][str(s)][f"{metric}_std"] for s in steps], capsize=3,
                        label=labels[row], **style)
        for key, label in refs:
            ax.axhline(ref[key], color="gray", lw=1, ls=":" if key != "heldout_ppl" else "-", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(args.steps), [str(s) for s in args.steps])
        if metric == "gen_ppl":
            ax.set_yscale("log")
        ax.set_xlabel("token steps T")
        ax.set_ylabel(ylabel)
        ax.set_title(f"Tiny Shakespeare, {len(args.seeds)} seeds x {args.num} samples per point", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(Path(args.results) / name, dpi=120)
        plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", default=str(ROOT / "examples"))
    p.add_argument("--corpus", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    p.add_argument("--cache", default=str(ROOT / "runs" / "text_quality"))
    p.add_argument("--results", default=str(ROOT / "results"))
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {','.join(ROWS)}")
    p.add_argument("--steps", default=",".join(map(str, STEPS)))
    p.add_argument("--ablation-steps", default="1,2,4,8")
    p.add_argument("--seq-prompt-steps", default="1,2,4,16")
    p.add_argument("--seq-latent-steps", type=int, default=128)
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--num", type=int, default=256, help="samples per seed")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--score", action="store_true", help="score the cached samples and write results/")
    args = p.parse_args()
    args.rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(args.rows) - set(ROWS))
    if unknown:
        raise SystemExit(f"--rows {unknown} unknown; choose from {','.join(ROWS)}")
    args.steps = [int(s) for s in args.steps.split(",")]
    args.ablation_steps = [int(s) for s in args.ablation_steps.split(",")]
    args.seq_prompt_steps = [int(s) for s in args.seq_prompt_steps.split(",")]
    args.seeds = [1000 * int(s) for s in args.seeds.split(",")]  # seed s + b per batch: keep seeds apart
    torch.set_num_threads(args.threads)
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    if args.score:
        score(args)
    else:
        for row in args.rows:
            draw_row(row, args)


if __name__ == "__main__":
    main()
