"""Runtime benchmark: ORT-CPU sampling loop vs the torch eager reference sampler, per example.

    python benchmarks/runtime_bench.py --threads 1 --json runtime_bench.json

For each examples/sawtooth-*.pt: build (or reuse) its bundle under --bundles with
`lddm_export.build.build_bundle` (fp32 + fp16 ONNX, no engines), then time one sampling
call at each batch size with `lddm_export.bench.bench_bundle`: the runtime on
onnxruntime's CPU provider vs training/sampling.py's sampler on the checkpoint's eager torch
modules, same draws, same thread count. Then, per example, the trajectory parity of ORT FP32
and FP16 against the torch backend (which is the reference token for token) at B = 64: token
agreement per step and the max abs error of y0_hat. Prints the markdown tables recorded in
RESULTS.md. Target: the runtime >= 2x the reference's samples/s at B = 1 and 32.

To show how far from this CPU's arithmetic limit both sides are, each row also gives the
matmul GFLOP/s of the runtime and of the reference: the MatMul/Gemm FLOPs of one network
evaluation (counted in the FP32 ONNX graph at that batch, 2 * M * N * K per node, after
shape inference) times the evaluations per step, over the time per step; and the ceiling is
this core's own float32 GEMM rate (torch, 1024^3, the thread count given).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bundles import benchmark_bundle  # noqa: E402
from lddm_export.bench import bench_bundle, format_table  # noqa: E402
from runtimes.backends import make_runners  # noqa: E402
from runtimes.bundle import Bundle  # noqa: E402
from runtimes.noise import draw_noise, latent_shape  # noqa: E402
from runtimes.samplers import Sampler, sampler_graphs  # noqa: E402
from runtimes.schedules import latent_steps_for  # noqa: E402
from training.checkpoint import load_reference_graphs  # noqa: E402


def matmul_flops(path: Path, batch: int) -> int:
    """FLOPs of every MatMul and Gemm of an ONNX graph at batch `batch` (2 * output elements * K)."""
    model = onnx.load(str(path))
    for value in list(model.graph.input) + list(model.graph.output):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param:  # the batch axis, the only symbolic one (docs/design.md)
                dim.dim_value = batch
    del model.graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
    shapes.update({init.name: list(init.dims) for init in model.graph.initializer})
    total = 0
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        a, out = shapes.get(node.input[0]), shapes.get(node.output[0])
        if not a or not out or 0 in a + out:
            raise ValueError(f"{path}: shape inference left {node.op_type} {node.name} without static shapes")
        trans_a = any(attr.name == "transA" and attr.i for attr in node.attribute)
        total += 2 * math.prod(out) * (a[-2] if trans_a else a[-1])
    return total


def step_flops(bundle: Bundle, batch: int) -> float:
    """Matmul FLOPs of one sampling step: one evaluation of the graph each step uses (seq: the mean
    of a latent and a token step, which the benchmark runs equally often)."""
    flops = [matmul_flops(bundle.onnx_path(g, "fp32"), batch) for g in sampler_graphs(bundle.variant, "dense")]
    return sum(flops) / len(flops)


def gemm_ceiling_gflops(threads: int, n: int = 1024, repeat: int = 20) -> float:
    """This machine's float32 GEMM rate on `threads` threads (torch, n x n x n, median of `repeat`)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    times = []
    for _ in range(repeat + 3):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / sorted(times[3:])[repeat // 2] / 1e9


def trajectory_parity(bundle: Bundle, precision: str, batch: int, steps: int, threads: int) -> dict:
    """ORT (precision) vs the torch backend (= the reference, token for token) on the same draws.

    Returns:
        {"precision", "final_token_agreement", "min_step_token_agreement",
         "max_step_y0_hat_err" (max abs over steps; None for mdlm)}.
    """
    shapes = bundle.shapes
    noise = draw_noise(0, batch, steps, shapes["L"], latent_shape(bundle.variant, shapes))
    latent_steps = latent_steps_for(bundle.variant, steps)
    trajectories = []
    for backend, prec in (("torch", "fp32"), ("ort", precision)):
        runners = make_runners(bundle, backend, prec, "cpu", graphs=list(sampler_graphs(bundle.variant, "dense")), threads=threads,
                               reference=load_reference_graphs)
        for runner in runners.values():
            runner.activate()
        trajectories.append(list(Sampler.from_bundle(bundle, runners, head="dense").steps(noise, latent_steps)))
    agreements = [(a.x == b.x).double().mean().item() for a, b in zip(*trajectories)]
    errors = [(a.y0_hat - b.y0_hat).abs().max().item() for a, b in zip(*trajectories) if a.y0_hat is not None]
    return {"variant": bundle.variant, "precision": precision, "batch": batch, "steps": steps,
            "final_token_agreement": agreements[-1], "min_step_token_agreement": min(agreements),
            "max_step_y0_hat_err": max(errors) if errors else None}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=Path, default=ROOT / "examples")
    parser.add_argument("--bundles", type=Path, default=ROOT / "bundles")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--steps", type=int, default=16, help="token steps (seq: also latent steps)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for both sides")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    examples = [p for p in sorted(args.examples.glob("sawtooth-*.pt")) if p.name.count(".") == 1]
    if not examples:
        sys.exit(f"runtime_bench: no examples/sawtooth-*.pt under {args.examples}; train them first (examples/README.md)")
    batches = [int(b) for b in args.batches.split(",")]
    rows, parity = [], []
    ceiling = gemm_ceiling_gflops(args.threads)
    for ckpt in examples:
        bundle = benchmark_bundle(ckpt, args.bundles, ("fp32", "fp16"))
        new = bench_bundle(bundle, "ort", "fp32", "cpu", batches, args.steps, None, args.repeat, args.threads,
                           head="dense")
        for row in new:
            gflop = step_flops(bundle, row["batch"]) / 1e9
            row["matmul_gflop_per_step"] = gflop
            row["runtime_gflops"] = gflop / (row["runtime_ms_per_step"] / 1e3)
            row["reference_gflops"] = gflop / (row["reference_ms_per_step"] / 1e3)
        rows += new
        print(format_table(new).splitlines()[-1], flush=True)
        parity += [trajectory_parity(bundle, p, 64, args.steps, args.threads) for p in ("fp32", "fp16")]
    print(format_table(rows))
    print(f"\nfloat32 GEMM ceiling of this CPU on {args.threads} thread(s): {ceiling:.1f} GFLOP/s\n\n"
          "| variant | batch | matmul GFLOP per step | runtime GFLOP/s | torch eager GFLOP/s | "
          "runtime / ceiling | needed for 2x / ceiling |\n|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['batch']} | {r['matmul_gflop_per_step']:.4f} | {r['runtime_gflops']:.1f} | "
              f"{r['reference_gflops']:.1f} | {r['runtime_gflops'] / ceiling:.0%} | "
              f"{2 * r['reference_gflops'] / ceiling:.0%} |")
    print("\n| variant | ORT precision | B | steps | final token agreement | min per-step agreement | "
          "max per-step y0_hat abs err |\n|---|---|---:|---:|---:|---:|---:|")
    for p in parity:
        err = "-" if p["max_step_y0_hat_err"] is None else f"{p['max_step_y0_hat_err']:.2e}"
        print(f"| {p['variant']} | {p['precision']} | {p['batch']} | {p['steps']} | {p['final_token_agreement']:.5f} | "
              f"{p['min_step_token_agreement']:.5f} | {err} |")
    if args.json:
        args.json.write_text(json.dumps({"speed": rows, "gemm_ceiling_gflops": ceiling,
                                         "trajectory_parity": parity}, indent=2))
    return rows


if __name__ == "__main__":
    main()
