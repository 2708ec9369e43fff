"""Runtime benchmark: ORT-CPU sampling loop vs the torch eager reference sampler, per example.

    python benchmarks/runtime_bench.py --threads 1 --json runtime_bench.json

For each examples/sawtooth-*.pt: build (or reuse) its bundle under --bundles with
`lddm_export.build.build_bundle` (fp32 + fp16 ONNX, no engines), then time one sampling
call at each batch size with `lddm_export.commands.bench.bench_bundle`: the runtime on
onnxruntime's CPU provider vs training/sampling.py's sampler on the checkpoint's eager torch
modules, same draws, same thread count. Then, per example, the trajectory parity of ORT FP32
and FP16 against the torch backend (which is the reference token for token) at B = 64: token
agreement per step and the max abs error of y0_hat. Prints the markdown tables recorded in
RESULTS.md. Target: the runtime >= 2x the reference's samples/s at B = 1 and 32.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lddm_export.build import DEFAULT_OPSET, build_bundle, parse_options  # noqa: E402
from lddm_export.commands.bench import bench_bundle, format_table  # noqa: E402
from lddm_export.manifest import sha256_file  # noqa: E402
from runtimes.backends import make_runners  # noqa: E402
from runtimes.bundle import Bundle  # noqa: E402
from runtimes.noise import draw_noise  # noqa: E402
from runtimes.samplers import GRAPHS, Sampler  # noqa: E402


def example_bundle(ckpt: Path, bundles: Path) -> Bundle:
    """The bundle of `ckpt` under `bundles`, rebuilt only when it was built from another checkpoint
    or at another opset than the default."""
    out = bundles / ckpt.stem
    manifest = out / "manifest.json"
    old = json.loads(manifest.read_text()) if manifest.is_file() else None
    if not (old and old["checkpoint"]["sha256"] == sha256_file(ckpt) and old["opset"] == DEFAULT_OPSET):
        build_bundle(ckpt, out, parse_options("fp32,fp16", engines="off", force=True), log=lambda line: None)
    return Bundle.open(out)


def trajectory_parity(bundle: Bundle, precision: str, batch: int, steps: int, threads: int) -> dict:
    """ORT (precision) vs the torch backend (= the reference, token for token) on the same draws.

    Returns:
        {"precision", "final_token_agreement", "min_step_token_agreement",
         "max_step_y0_hat_err" (max abs over steps; None for mdlm)}.
    """
    shapes = bundle.shapes
    latent_shape = None if bundle.variant == "mdlm" else (shapes["P"], shapes["D"])
    noise = draw_noise(0, batch, steps, shapes["L"], latent_shape)
    latent_steps = steps if bundle.variant == "seq" else None
    trajectories = []
    for backend, prec in (("torch", "fp32"), ("ort", precision)):
        runners = make_runners(bundle, backend, prec, "cpu", graphs=list(GRAPHS[bundle.variant]), threads=threads)
        for runner in runners.values():
            runner.activate()
        trajectories.append(list(Sampler.from_bundle(bundle, runners).steps(noise, latent_steps)))
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
    for ckpt in examples:
        bundle = example_bundle(ckpt, args.bundles)
        rows += bench_bundle(bundle, "ort", "fp32", "cpu", batches, args.steps, None, args.repeat, args.threads)
        print(format_table(rows[-len(batches):]).splitlines()[-1], flush=True)
        parity += [trajectory_parity(bundle, p, 64, args.steps, args.threads) for p in ("fp32", "fp16")]
    print(format_table(rows))
    print("\n| variant | ORT precision | B | steps | final token agreement | min per-step agreement | "
          "max per-step y0_hat abs err |\n|---|---|---:|---:|---:|---:|---:|")
    for p in parity:
        err = "-" if p["max_step_y0_hat_err"] is None else f"{p['max_step_y0_hat_err']:.2e}"
        print(f"| {p['variant']} | {p['precision']} | {p['batch']} | {p['steps']} | {p['final_token_agreement']:.5f} | "
              f"{p['min_step_token_agreement']:.5f} | {err} |")
    if args.json:
        args.json.write_text(json.dumps({"speed": rows, "trajectory_parity": parity}, indent=2))
    return rows


if __name__ == "__main__":
    main()
