"""Prompted continuation and infilling on the text examples: MDLM vs FUJI vs SEQ.

    python benchmarks/prompted.py --threads 1        # results/prompted.{json,png} and a markdown table

From the held-out tail of the corpus (never trained on), --prompts blocks of L = 128 tokens:
- continuation: the first 64 tokens clamped (runtimes/prompts.py), the other 64 generated;
  scored by the AR evaluator's perplexity of the generated tokens given everything before them;
- infilling: tokens 48..79 cut out and generated, the rest clamped; scored by the AR perplexity
  of the filled span given the text before it, and by the token accuracy against the original.
Sampled with the runtime sampler (ORT-CPU FP32, sparse head) at T in --steps token steps (SEQ:
as many latent steps), mean and std over --seeds; the bundles are built under --bundles. SEQ's
latent chain does not see the clamped tokens, so its latent may contradict them: the SEQ rows
show what that costs next to FUJI, whose denoiser sees them at every step, the "seq C=8"
rows what choosing among 8 latent chains the one that best explains the prompt gives back, and
the "seq-prompt" rows what a prompt-aware latent denoiser gives (examples/text-seq-prompt.pt:
text-seq.pt's encoder and token denoiser with a latent denoiser that reads the clamped tokens).

For the SEQ models also: how much of the held-out blocks' latent (the encoder's) the latent
denoiser's first estimate (t = 1, y_t pure noise) recovers given each task's clamped tokens, as
a mean squared error (1 ~ nothing; a plain SEQ latent denoiser ignores the tokens).

--variants reruns some models only; the rows of the others are kept from the existing
results/prompted.json, whose "commands" lists every run that made it.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bundles import benchmark_bundle  # noqa: E402
from runtimes.backends import make_runners  # noqa: E402
from runtimes.fileio import write_json  # noqa: E402
from runtimes.prompts import FREE  # noqa: E402
from runtimes.samplers import Sampler, sample_batches, sampler_graphs  # noqa: E402
from runtimes.schedules import latent_steps_for  # noqa: E402
from training.checkpoint import load_checkpoint  # noqa: E402
from training.data import TextData  # noqa: E402
from training.metrics import ar_perplexity  # noqa: E402

PROMPT_TOKENS, SPAN = 64, (48, 80)
CHECKPOINTS = {"mdlm": "text-mdlm.pt", "fuji": "text-fuji.pt", "seq": "text-seq.pt", "seq-prompt": "text-seq-prompt.pt"}


def tasks(blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    """task -> known [N, L]: the clamped tokens of each held-out block."""
    continuation = blocks.clone()
    continuation[:, PROMPT_TOKENS:] = FREE
    infilling = blocks.clone()
    infilling[:, SPAN[0]:SPAN[1]] = FREE
    return {"continuation": continuation, "infilling": infilling}


@torch.no_grad()
def latent_mse(model, blocks: torch.Tensor, known: torch.Tensor, seed: int = 0) -> float:
    """MSE of a SEQ latent denoiser's estimate at t = 1 against the encoder's latent of `blocks`,
    given the clamped tokens `known` (FREE where generated)."""
    target = model.encoder(blocks)
    y_1 = torch.randn(target.shape, generator=torch.Generator().manual_seed(seed))
    clamped = torch.where(known == FREE, model.cfg.mask_id, known)
    estimate = model.latent_denoiser(y_1, torch.ones(len(blocks)), clamped)
    return float(((estimate - target) ** 2).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", default=str(ROOT / "examples"))
    p.add_argument("--corpus", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    p.add_argument("--bundles", default=str(ROOT / "runs" / "sparse_head_bundles"))
    p.add_argument("--variants", default=",".join(CHECKPOINTS), help=f"models to run, of {','.join(CHECKPOINTS)}")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--steps", default="4,16,64")
    p.add_argument("--seeds", default="0,1,2", help="sampling seeds (mean and std over them)")
    p.add_argument("--latent-candidates", default="1,8",
                   help="SEQ rows: latent chains per sample, the one that best explains the prompt kept")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", default=str(ROOT / "results"))
    p.add_argument("--report", action="store_true",
                   help="only print the table of --results' prompted.json and redraw prompted.png")
    args = p.parse_args()
    if args.report:
        return report(Path(args.results) / "prompted.json")
    variants = args.variants.split(",")
    if not set(variants) <= set(CHECKPOINTS):
        raise SystemExit(f"--variants {args.variants}: choose among {','.join(CHECKPOINTS)}")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    ar, ar_ckpt = load_checkpoint(Path(args.examples) / "text-ar.pt")
    cfg = ar_ckpt["config"]
    data = TextData(f"text:{args.corpus}", cfg["seq_len"], "bpe", cfg["vocab_size"])
    if data.tokenizer["json"] != ar_ckpt["tokenizer"]["json"]:
        raise SystemExit(f"--corpus {args.corpus} does not give the AR model's tokenizer; pass its corpus")
    blocks = data.heldout_blocks[: args.prompts]
    known = tasks(blocks)
    rows, fits = [], {}
    candidates = [int(c) for c in args.latent_candidates.split(",")]
    for name in variants:
        bundle = benchmark_bundle(Path(args.examples) / CHECKPOINTS[name], Path(args.bundles))
        variant = bundle.variant
        runners = make_runners(bundle, "ort", "fp32", "cpu", graphs=list(sampler_graphs(variant)), threads=args.threads)
        sampler = Sampler.from_bundle(bundle, {g: r.activate() for g, r in runners.items()})
        if variant == "seq":
            model = load_checkpoint(Path(args.examples) / CHECKPOINTS[name])[0]
            fits[name] = {task: latent_mse(model, blocks, clamped)
                          for task, clamped in {"unprompted": torch.full_like(blocks, FREE), **known}.items()}
            print(json.dumps({"latent_mse_at_t1": {name: fits[name]}}), flush=True)
        for steps, C, (task, clamped) in itertools.product(
                (int(s) for s in args.steps.split(",")), candidates if variant == "seq" else [1], known.items()):
            generated = clamped == FREE
            per_seed = []
            for seed in seeds:
                tokens = sample_batches(sampler, seed, len(blocks), steps, latent_steps_for(variant, steps), 64,
                                        known=clamped, latent_candidates=C).tokens
                per_seed.append({"gen_ppl": ar_perplexity(ar, tokens, scored=generated),
                                 "token_accuracy": float((tokens[generated] == blocks[generated]).double().mean())})
            row = {"variant": name if C == 1 else f"{name} C={C}", "model": name, "task": task, "steps": steps,
                   "latent_candidates": C, "prompts": len(blocks), "seeds": seeds, **mean_std(per_seed, "gen_ppl")}
            if task == "infilling":
                row.update(mean_std(per_seed, "token_accuracy"))
                row["original_ppl"] = ar_perplexity(ar, blocks, scored=generated)
            print(json.dumps(row), flush=True)
            rows.append(row)
    reference = {"heldout_continuation_ppl": ar_perplexity(ar, blocks, scored=known["continuation"] == FREE)}
    path = Path(args.results) / "prompted.json"
    earlier = json.loads(path.read_text()) if path.is_file() else {"commands": [], "rows": [], "latent_mse_at_t1": {}}
    kept = [r for r in earlier["rows"] if r["model"] not in variants]
    path.parent.mkdir(parents=True, exist_ok=True)
    command = {"command": " ".join(["python", "benchmarks/prompted.py", *sys.argv[1:]]),
               "seconds": time.perf_counter() - started, "variants": variants}
    rows = sorted(kept + rows, key=lambda r: list(CHECKPOINTS).index(r["model"]))
    fits = {**{k: v for k, v in earlier["latent_mse_at_t1"].items() if k not in variants}, **fits}
    write_json(path, {"commands": earlier["commands"] + [command], "reference": reference, "rows": rows,
                      "latent_mse_at_t1": fits}, "the benchmark results")
    report(path)


def report(path: Path) -> None:
    """Print the markdown table of a results file and draw its plot (prompted.png beside it)."""
    results = json.loads(path.read_text())
    rows = results["rows"]
    print(f"held-out continuations under the AR model: {results['reference']['heldout_continuation_ppl']:.1f}")
    print("| variant | T | continuation gen PPL | infilling gen PPL | infilling token accuracy |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        if r["task"] == "continuation":
            fill = next(x for x in rows if x["task"] == "infilling" and x["variant"] == r["variant"]
                        and x["steps"] == r["steps"])
            print(f"| {r['variant']} | {r['steps']} | {r['gen_ppl']:.1f} ± {r['gen_ppl_std']:.1f} | "
                  f"{fill['gen_ppl']:.1f} ± {fill['gen_ppl_std']:.1f} | "
                  f"{fill['token_accuracy']:.4f} ± {fill['token_accuracy_std']:.4f} |")
    plot(rows, path.with_suffix(".png"))


def plot(rows: list[dict], out: Path) -> None:
    """Continuation gen PPL and infilling token accuracy against T, one line per variant."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("continuation", "gen_ppl", "continuation: gen PPL of the generated half"),
              ("infilling", "token_accuracy", "infilling: token accuracy of the 32-token span"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (task, metric, title) in zip(axes, panels):
        for variant in dict.fromkeys(r["variant"] for r in rows):
            cells = sorted((r for r in rows if r["variant"] == variant and r["task"] == task), key=lambda r: r["steps"])
            ax.errorbar([r["steps"] for r in cells], [r[metric] for r in cells], yerr=[r[f"{metric}_std"] for r in cells],
                        capsize=3, marker="o", ls="--" if "C=" in variant else "-", label=variant)
        steps = sorted({r["steps"] for r in rows})
        ax.set_xscale("log", base=2)
        ax.set_xticks(steps, [str(s) for s in steps])
        ax.set_xlabel("token steps T")
        ax.set_title(title, fontsize=9)
        if metric == "gen_ppl":
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle("Prompted text, 64 held-out blocks x 3 seeds (mean ± std)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def mean_std(per_seed: list[dict], key: str) -> dict:
    """{key: mean, key_std: sample std (0 for one seed)} over the seeds."""
    values = np.array([v[key] for v in per_seed])
    return {key: float(values.mean()), f"{key}_std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}


if __name__ == "__main__":
    main()
