"""Dense vs sparse head: ms per sampling call and samples/s on ONNX Runtime (CPU), FP32.

    python benchmarks/sparse_head.py --threads 1      # results/sparse_head.{json,png}, a markdown table
    python benchmarks/sparse_head.py --report         # the table and the plot again from the json

The sparse head (docs/design.md, "The sparse head") computes log-probs only at the positions that
unmask in a step, and skips the head (MDLM and SEQ's token chain: the whole forward) when none
does. For every model, batch B in --batches and token steps T in --steps, one sampling call is
timed with each head on the same noise (median of --repeat alternating calls after a warm-up of
each), and the tokens of the two calls are compared. Also measured, for the sparse sampler: the
time outside the graphs over the time inside them (target <= 10%; lddm_export.bench.sampler_overhead,
the median of 3 instrumented calls), with the contract's float64 draws and with float32 draws
(`--float32-draws`).

Models:
- the text examples (examples/text-{mdlm,fuji,seq}.pt; V = 1024, width 128, 4 blocks, L = 128);
- an edge-shaped MDLM with random weights: V = 32768, width 256, 4 blocks, 4 heads, L = 128,
  where the head is about 70% of the FLOPs per position (target: >= 2x samples/s at T = 16, B = 32).
Bundles are built once under --bundles (FP32, no calibration, no engines).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lddm_export.bench import paired_median_seconds, sampler_overhead  # noqa: E402
from benchmarks.bundles import benchmark_bundle  # noqa: E402
from runtimes.backends import make_runners  # noqa: E402
from runtimes.bundle import Bundle  # noqa: E402
from runtimes.fileio import write_json  # noqa: E402
from runtimes.noise import draw_noise, latent_shape  # noqa: E402
from runtimes.samplers import Sampler, sampler_graphs  # noqa: E402
from runtimes.schedules import latent_steps_for  # noqa: E402
from training.checkpoint import save_checkpoint  # noqa: E402
from training.config import ModelConfig  # noqa: E402
from training.model import LDDM  # noqa: E402

EDGE = dict(vocab_size=32767, seq_len=128, width=256, depth=4, heads=4, cond_dim=128)


def edge_checkpoint(path: Path, config: dict = EDGE) -> Path:
    """The random-weight edge-shaped MDLM (seeded; every weight N(0, 0.02^2), so logits vary)."""
    if not path.is_file():
        torch.manual_seed(0)
        model = LDDM(ModelConfig(variant="mdlm", **config))
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, 0.02)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, model, tokenizer=None, train={"steps": 0, "note": "random edge-shaped benchmark model"})
    return path


def bench_model(bundle: Bundle, name: str, args) -> list[dict]:
    variant, shapes = bundle.variant, bundle.shapes
    graphs = sorted(set(sampler_graphs(variant, "dense")) | set(sampler_graphs(variant, "sparse")))
    runners = {g: r.activate() for g, r in make_runners(bundle, "ort", "fp32", "cpu", graphs=graphs,
                                                        threads=args.threads).items()}
    samplers = {head: Sampler.from_bundle(bundle, {g: runners[g] for g in sampler_graphs(variant, head)}, head=head)
                for head in ("dense", "sparse")}
    rows = []
    for batch in args.batches:
        for steps in args.steps:
            latent_steps = latent_steps_for(variant, steps)
            noise = draw_noise(0, batch, steps, shapes["L"], latent_shape(variant, shapes))
            tokens = {head: s.sample(noise, latent_steps).tokens for head, s in samplers.items()}
            t_dense, t_sparse = paired_median_seconds(lambda: samplers["dense"].sample(noise, latent_steps),
                                                      lambda: samplers["sparse"].sample(noise, latent_steps),
                                                      args.repeat)
            sparse_runners = {g: runners[g] for g in sampler_graphs(variant, "sparse")}
            overhead, overhead_f32 = (sampler_overhead(bundle, sparse_runners, noise, latent_steps, lambda: None,
                                                       head="sparse", float64_draws=f64) for f64 in (True, False))
            row = {"model": name, "variant": variant, "V": shapes["V"], "W": shapes["W"], "batch": batch,
                   "steps": steps, "dense_ms": 1e3 * t_dense, "sparse_ms": 1e3 * t_sparse,
                   "dense_samples_per_s": batch / t_dense, "sparse_samples_per_s": batch / t_sparse,
                   "speedup": t_dense / t_sparse, "sparse_sampler_overhead": overhead,
                   "sparse_sampler_overhead_float32_draws": overhead_f32,
                   "tokens_differing": int((tokens["dense"] != tokens["sparse"]).sum())}
            rows.append(row)
            print(f"{name:10s} B={batch:3d} T={steps:3d}: dense {row['dense_ms']:9.1f} ms, sparse "
                  f"{row['sparse_ms']:9.1f} ms ({row['speedup']:.2f}x), overhead {100 * overhead:.1f}% "
                  f"({100 * overhead_f32:.1f}% with float32 draws), "
                  f"tokens differing {row['tokens_differing']}", flush=True)
    for runner in runners.values():
        runner.deactivate()
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | B | T | dense ms/call | sparse ms/call | dense samples/s | sparse samples/s | speedup | "
             "sparse: time outside graphs | (float32 draws) | tokens differing |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['steps']} | {r['dense_ms']:.1f} | {r['sparse_ms']:.1f} | "
                     f"{r['dense_samples_per_s']:.2f} | {r['sparse_samples_per_s']:.2f} | {r['speedup']:.2f}x | "
                     f"{100 * r['sparse_sampler_overhead']:.1f}% | "
                     f"{100 * r['sparse_sampler_overhead_float32_draws']:.1f}% | {r['tokens_differing']} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Top: sparse / dense samples/s; bottom: the sparse sampler's time outside the graphs (float64
    draws solid, float32 dashed) against the 10% target; one column per batch size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(2, len(batches), figsize=(5 * len(batches), 7), squeeze=False)
    for column, batch in enumerate(batches):
        speed, overhead = axes[0][column], axes[1][column]
        for i, model in enumerate(dict.fromkeys(r["model"] for r in rows)):
            cells = [r for r in rows if r["model"] == model and r["batch"] == batch]
            steps, color = [r["steps"] for r in cells], f"C{i}"
            speed.plot(steps, [r["speedup"] for r in cells], marker="o", color=color, label=model)
            overhead.plot(steps, [100 * r["sparse_sampler_overhead"] for r in cells], marker="o", color=color,
                          label=model)
            overhead.plot(steps, [100 * r["sparse_sampler_overhead_float32_draws"] for r in cells], ls="--",
                          color=color, alpha=0.6)
        speed.axhline(1.0, color="gray", lw=1, ls=":")
        speed.set_ylabel("sparse / dense samples/s")
        speed.set_title(f"ORT-CPU FP32, B = {batch}", fontsize=9)
        overhead.axhline(10.0, color="black", lw=1, ls=":", label="target 10%")
        overhead.set_ylim(bottom=0)
        overhead.set_ylabel("sparse sampler: time outside graphs (%)")
        overhead.set_title(f"B = {batch}; dashed: float32 draws", fontsize=9)
        for ax in (speed, overhead):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("token steps T")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", default=str(ROOT / "examples"))
    p.add_argument("--bundles", default=str(ROOT / "runs" / "sparse_head_bundles"))
    p.add_argument("--models", default="text-mdlm,text-fuji,text-seq,edge-mdlm")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--steps", default="4,16,64")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", default=str(ROOT / "results"))
    p.add_argument("--report", action="store_true",
                   help="measure nothing: the table and the plot again from the results' sparse_head.json")
    args = p.parse_args()
    results = Path(args.results)
    if args.report:
        if not (results / "sparse_head.json").is_file():
            raise SystemExit(f"--report: {results / 'sparse_head.json'} does not exist; run the benchmark first "
                             f"or pass the --results folder that holds it")
        rows = json.loads((results / "sparse_head.json").read_text())["rows"]
        plot(rows, results / "sparse_head.png")
        print(markdown(rows))
        return
    args.batches = [int(b) for b in args.batches.split(",")]
    args.steps = [int(s) for s in args.steps.split(",")]
    torch.set_num_threads(args.threads)
    bundles = Path(args.bundles)
    started, rows = time.perf_counter(), []
    for name in args.models.split(","):
        ckpt = edge_checkpoint(bundles / "edge-mdlm.pt") if name == "edge-mdlm" else Path(args.examples) / f"{name}.pt"
        rows += bench_model(benchmark_bundle(ckpt, bundles, batch_max=max(args.batches)), name, args)
    results.mkdir(parents=True, exist_ok=True)
    write_json(results / "sparse_head.json",
               {"command": " ".join(["python", "benchmarks/sparse_head.py", *sys.argv[1:]]),
                "threads": args.threads, "repeat": args.repeat, "edge_model": EDGE, "rows": rows,
                "seconds": time.perf_counter() - started}, "the benchmark results")
    plot(rows, results / "sparse_head.png")
    print(markdown(rows))


if __name__ == "__main__":
    main()
