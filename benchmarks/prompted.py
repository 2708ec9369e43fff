"""Prompted continuation and infilling on the text examples: MDLM vs FUJI vs SEQ.

    python benchmarks/prompted.py --threads 1        # results/prompted.json and a markdown table

From the held-out tail of the corpus (never trained on), --prompts blocks of L = 128 tokens:
- continuation: the first 64 tokens clamped (runtimes/prompts.py), the other 64 generated;
  scored by the AR evaluator's perplexity of the generated tokens given everything before them;
- infilling: tokens 48..79 cut out and generated, the rest clamped; scored by the AR perplexity
  of the filled span given the text before it, and by the token accuracy against the original.
Sampled with the runtime sampler (ORT-CPU FP32, sparse head) at T in --steps token steps (SEQ:
as many latent steps), mean and std over --seeds; the bundles are built under --bundles. SEQ's
latent chain does not see the clamped tokens, so its latent may contradict them: the SEQ rows
show what that costs next to FUJI, whose denoiser sees them at every step, and the "seq C=8"
rows what choosing among 8 latent chains the one that best explains the prompt gives back.
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


def tasks(blocks: torch.Tensor) -> dict[str, torch.Tensor]:
    """task -> known [N, L]: the clamped tokens of each held-out block."""
    continuation = blocks.clone()
    continuation[:, PROMPT_TOKENS:] = FREE
    infilling = blocks.clone()
    infilling[:, SPAN[0]:SPAN[1]] = FREE
    return {"continuation": continuation, "infilling": infilling}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", default=str(ROOT / "examples"))
    p.add_argument("--corpus", default=str(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"))
    p.add_argument("--bundles", default=str(ROOT / "runs" / "sparse_head_bundles"))
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--steps", default="4,16,64")
    p.add_argument("--seeds", default="0,1,2", help="sampling seeds (mean and std over them)")
    p.add_argument("--latent-candidates", default="1,8",
                   help="SEQ rows: latent chains per sample, the one that best explains the prompt kept")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", default=str(ROOT / "results"))
    args = p.parse_args()
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
    rows = []
    candidates = [int(c) for c in args.latent_candidates.split(",")]
    for variant in ("mdlm", "fuji", "seq"):
        bundle = benchmark_bundle(Path(args.examples) / f"text-{variant}.pt", Path(args.bundles))
        runners = make_runners(bundle, "ort", "fp32", "cpu", graphs=list(sampler_graphs(variant)), threads=args.threads)
        sampler = Sampler.from_bundle(bundle, {g: r.activate() for g, r in runners.items()})
        for steps, C, (task, clamped) in itertools.product(
                (int(s) for s in args.steps.split(",")), candidates if variant == "seq" else [1], known.items()):
            generated = clamped == FREE
            per_seed = []
            for seed in seeds:
                tokens = sample_batches(sampler, seed, len(blocks), steps, latent_steps_for(variant, steps), 64,
                                        known=clamped, latent_candidates=C).tokens
                per_seed.append({"gen_ppl": ar_perplexity(ar, tokens, scored=generated),
                                 "token_accuracy": float((tokens[generated] == blocks[generated]).double().mean())})
            row = {"variant": variant if C == 1 else f"{variant} C={C}", "task": task, "steps": steps,
                   "latent_candidates": C, "prompts": len(blocks), "seeds": seeds, **mean_std(per_seed, "gen_ppl")}
            if task == "infilling":
                row.update(mean_std(per_seed, "token_accuracy"))
                row["original_ppl"] = ar_perplexity(ar, blocks, scored=generated)
            print(json.dumps(row), flush=True)
            rows.append(row)
    reference = {"heldout_continuation_ppl": ar_perplexity(ar, blocks, scored=known["continuation"] == FREE)}
    Path(args.results).mkdir(parents=True, exist_ok=True)
    write_json(Path(args.results) / "prompted.json",
               {"command": " ".join(["python", "benchmarks/prompted.py", *sys.argv[1:]]), "reference": reference,
                "rows": rows, "seconds": time.perf_counter() - started}, "the benchmark results")
    print(f"held-out continuations under the AR model: {reference['heldout_continuation_ppl']:.1f}")
    print("| variant | T | continuation gen PPL | infilling gen PPL | infilling token accuracy |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        if r["task"] == "continuation":
            fill = next(x for x in rows if x["task"] == "infilling" and x["variant"] == r["variant"]
                        and x["steps"] == r["steps"])
            print(f"| {r['variant']} | {r['steps']} | {r['gen_ppl']:.1f} ± {r['gen_ppl_std']:.1f} | "
                  f"{fill['gen_ppl']:.1f} ± {fill['gen_ppl_std']:.1f} | "
                  f"{fill['token_accuracy']:.4f} ± {fill['token_accuracy_std']:.4f} |")


def mean_std(per_seed: list[dict], key: str) -> dict:
    """{key: mean, key_std: sample std (0 for one seed)} over the seeds."""
    values = np.array([v[key] for v in per_seed])
    return {key: float(values.mean()), f"{key}_std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}


if __name__ == "__main__":
    main()
