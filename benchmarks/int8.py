"""INT8 vs FP32 on ONNX Runtime (CPU): sample quality on the shipped examples, and speed.

    python benchmarks/int8.py --threads 1         # results/int8.json and a markdown table

Every example is built with `--precision fp32,int8` (calibration/int8.py: Q/DQ graphs from
onnxruntime's static quantiser, calibrated on the bundle's own sampling trajectories) under
--bundles. Then, with the runtime sampler on ORT-CPU (sparse head, the default), FP32 and INT8
fed the same seeds:
- sawtooth (mdlm, fuji, seq): SWD to fresh data over the SWD of two independent data draws (the
  floor, as in results/sawtooth.json), --sawtooth-samples samples at T = --sawtooth-steps;
- text (mdlm, fuji, seq): generative perplexity under examples/text-ar.pt and unigram entropy,
  --text-samples samples at each T of --text-steps;
- speed: one sampling call of the text examples at B = 1 and 32, T = 16 (median of --repeat
  alternating calls), samples/s.
Targets (the INT8 issue): quality within 10% of FP32, and >= 1.5x FP32's samples/s at B = 32.
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

from benchmarks.bundles import benchmark_bundle  # noqa: E402
from lddm_export.bench import paired_median_seconds  # noqa: E402
from runtimes.backends import make_runners  # noqa: E402
from runtimes.bundle import Bundle  # noqa: E402
from runtimes.fileio import write_json  # noqa: E402
from runtimes.noise import draw_noise, latent_shape  # noqa: E402
from runtimes.samplers import Sampler, sample_batches, sampler_graphs  # noqa: E402
from runtimes.schedules import latent_steps_for  # noqa: E402
from training.checkpoint import load_checkpoint  # noqa: E402
from training.data import sample_sawtooth  # noqa: E402
from training.metrics import ar_perplexity, sliced_wasserstein, unigram_entropy  # noqa: E402

PRECISIONS = ("fp32", "int8")


def samplers(bundle: Bundle, threads: int) -> dict[str, Sampler]:
    out = {}
    for precision in PRECISIONS:
        runners = make_runners(bundle, "ort", precision, "cpu", graphs=list(sampler_graphs(bundle.variant)),
                               threads=threads)
        out[precision] = Sampler.from_bundle(bundle, {g: r.activate() for g, r in runners.items()})
    return out


def draw(sampler: Sampler, num: int, steps: int, seed: int = 0) -> torch.Tensor:
    return sample_batches(sampler, seed, num, steps, latent_steps_for(sampler.variant, steps), 32).tokens


def sawtooth_rows(args, bundles: Path) -> list[dict]:
    rows = []
    for variant in ("mdlm", "fuji", "seq"):
        bundle = benchmark_bundle(Path(args.examples) / f"sawtooth-{variant}.pt", bundles, PRECISIONS)
        L, n = bundle.shapes["L"], args.sawtooth_samples
        data = sample_sawtooth(n, L, torch.Generator().manual_seed(10_000))
        floor = sliced_wasserstein(sample_sawtooth(n, L, torch.Generator().manual_seed(20_000)), data)
        row = {"model": f"sawtooth-{variant}", "steps": args.sawtooth_steps, "samples": n, "floor": floor}
        for precision, sampler in samplers(bundle, args.threads).items():
            row[f"{precision}_swd_over_floor"] = sliced_wasserstein(draw(sampler, n, args.sawtooth_steps), data) / floor
        row["relative_difference"] = row["int8_swd_over_floor"] / row["fp32_swd_over_floor"] - 1
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def text_rows(args, bundles: Path) -> tuple[list[dict], list[dict]]:
    evaluator = load_checkpoint(Path(args.examples) / "text-ar.pt")[0]
    quality, speed = [], []
    for variant in ("mdlm", "fuji", "seq"):
        bundle = benchmark_bundle(Path(args.examples) / f"text-{variant}.pt", bundles, PRECISIONS)
        by_precision = samplers(bundle, args.threads)
        for steps in args.text_steps:
            row = {"model": f"text-{variant}", "steps": steps, "samples": args.text_samples}
            for precision, sampler in by_precision.items():
                tokens = draw(sampler, args.text_samples, steps)
                row[f"{precision}_gen_ppl"], row[f"{precision}_entropy"] = ar_perplexity(evaluator, tokens), \
                    unigram_entropy(tokens)
            row["gen_ppl_relative_difference"] = row["int8_gen_ppl"] / row["fp32_gen_ppl"] - 1
            row["entropy_relative_difference"] = row["int8_entropy"] / row["fp32_entropy"] - 1
            print(json.dumps(row), flush=True)
            quality.append(row)
        for batch in (1, 32):
            noise = draw_noise(0, batch, 16, bundle.shapes["L"], latent_shape(variant, bundle.shapes))
            latent_steps = latent_steps_for(variant, 16)
            t32, t8 = paired_median_seconds(lambda: by_precision["fp32"].sample(noise, latent_steps),
                                            lambda: by_precision["int8"].sample(noise, latent_steps), args.repeat)
            row = {"model": f"text-{variant}", "batch": batch, "steps": 16, "fp32_samples_per_s": batch / t32,
                   "int8_samples_per_s": batch / t8, "speedup": t32 / t8}
            print(json.dumps(row), flush=True)
            speed.append(row)
    return quality, speed


def markdown(results: dict) -> str:
    lines = ["| model | T | samples | FP32 SWD/floor | INT8 SWD/floor | INT8 vs FP32 |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['steps']} | {r['samples']} | {r['fp32_swd_over_floor']:.3f} | "
              f"{r['int8_swd_over_floor']:.3f} | {100 * r['relative_difference']:+.1f}% |" for r in results["sawtooth"]]
    lines += ["", "| model | T | samples | FP32 gen PPL | INT8 gen PPL | INT8 vs FP32 | FP32 entropy | INT8 entropy |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['steps']} | {r['samples']} | {r['fp32_gen_ppl']:.1f} | {r['int8_gen_ppl']:.1f} | "
              f"{100 * r['gen_ppl_relative_difference']:+.1f}% | {r['fp32_entropy']:.3f} | {r['int8_entropy']:.3f} |"
              for r in results["text"]]
    lines += ["", "| model | B | T | FP32 samples/s | INT8 samples/s | speedup |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['batch']} | {r['steps']} | {r['fp32_samples_per_s']:.2f} | "
              f"{r['int8_samples_per_s']:.2f} | {r['speedup']:.2f}x |" for r in results["speed"]]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", default=str(ROOT / "examples"))
    p.add_argument("--bundles", default=str(ROOT / "runs" / "int8_bundles"))
    p.add_argument("--sawtooth-samples", type=int, default=1024)
    p.add_argument("--sawtooth-steps", type=int, default=4)
    p.add_argument("--text-samples", type=int, default=256)
    p.add_argument("--text-steps", default="4,16")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", default=str(ROOT / "results"))
    args = p.parse_args()
    args.text_steps = [int(s) for s in args.text_steps.split(",")]
    torch.set_num_threads(args.threads)
    started, bundles = time.perf_counter(), Path(args.bundles)
    results = {"command": " ".join(["python", "benchmarks/int8.py", *sys.argv[1:]]), "threads": args.threads,
               "sawtooth": sawtooth_rows(args, bundles)}
    results["text"], results["speed"] = text_rows(args, bundles)
    results["seconds"] = time.perf_counter() - started
    Path(args.results).mkdir(parents=True, exist_ok=True)
    write_json(Path(args.results) / "int8.json", results, "the benchmark results")
    print(markdown(results))


if __name__ == "__main__":
    main()
