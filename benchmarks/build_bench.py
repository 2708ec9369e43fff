"""Build time and artifact sizes of `lddm-export build` (ONNX FP32 + FP16, no engines).

    python benchmarks/build_bench.py [CKPT ...] [--repeat N] [--parity]

Default checkpoints: examples/sawtooth-{mdlm,fuji,seq}.pt. Each build runs as a user runs it,
`lddm-export build --ckpt CKPT --out DIR --engines off --force` in a fresh process (interpreter
start and imports included), into a temporary directory; the best of --repeat runs is kept.
Prints a Markdown table: wall and CPU time, and the bytes of every ONNX file and of the whole bundle.
With --parity, also the worst per-graph error of each bundle's ONNX graphs (ONNX Runtime CPU)
against the checkpoint's PyTorch modules over batch 1, 3, 8 x t in {0.001, 0.5, 0.999}, in the
metrics of runtimes/tolerances.py.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = [ROOT / "examples" / f"sawtooth-{v}.pt" for v in ("mdlm", "fuji", "seq")]


def build_once(ckpt: Path, out: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds user + system) of one `lddm-export build` subprocess.

    CPU time is reported beside wall time because this machine's two cores are shared: wall
    time grows with whatever else runs, CPU time much less.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lddm_export.cli", "build", "--ckpt", str(ckpt), "--out", str(out),
                    "--engines", "off", "--force"], check=True, capture_output=True, cwd=ROOT)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def sizes(bundle: Path) -> dict:
    """MB per precision (all graphs) and for the whole bundle directory."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    per_precision = {}
    for graph in manifest["graphs"].values():
        for precision, rel in graph["onnx"].items():
            per_precision[precision] = per_precision.get(precision, 0) + (bundle / rel).stat().st_size
    total = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    return {"variant": manifest["variant"], "graphs": len(manifest["graphs"]),
            **{f"{p}_mb": b / 1e6 for p, b in per_precision.items()}, "bundle_mb": total / 1e6}


def graph_parity(ckpt: Path, bundle: Path) -> list[str]:
    """Markdown rows: variant / graph / output, FP32 max rel, FP16 rel L2 and KL (worst case)."""
    import onnxruntime as ort
    import torch

    from lddm_export.export import sample_inputs
    from runtimes.bundle import Bundle
    from runtimes.compare import measure
    from runtimes.tolerances import graph_tolerances
    from training.checkpoint import load_checkpoint
    from training.model import graph_modules

    b, (model, _) = Bundle.open(bundle), load_checkpoint(ckpt)
    modules, rows = graph_modules(model), []
    for graph in b.graph_names:
        spec, worst = b.spec(graph), {}
        sessions = {p: ort.InferenceSession(str(b.onnx_path(graph, p)), providers=["CPUExecutionProvider"])
                    for p in ("fp32", "fp16")}
        generator = torch.Generator().manual_seed(1)
        for batch in (1, 3, 8):
            for t in (0.001, 0.5, 0.999):
                args = list(sample_inputs(spec, batch, b.shapes["V"], generator))
                if "t" in spec.input_names:
                    args[spec.input_names.index("t")] = torch.full((batch,), t)
                with torch.no_grad():
                    ref = modules[graph](*args)
                ref = dict(zip(spec.output_names, ref if isinstance(ref, tuple) else (ref,)))
                feed = {s.name: a.numpy() for s, a in zip(spec.inputs, args)}
                for precision, sess in sessions.items():
                    tolerances = graph_tolerances(precision, spec.output_names)
                    for name, got in zip(spec.output_names, sess.run(None, feed)):
                        r = measure(got, ref[name], tolerances[name])
                        key = (name, precision)
                        worst[key] = [max(a, b) for a, b in zip(worst.get(key, [0, 0, 0]), (r.max_rel, r.rel_l2, r.kl or 0))]
        for name in spec.output_names:
            fp16 = worst[name, "fp16"]
            kl = f"{fp16[2]:.1e}" if name == "log_probs" else "-"
            rows.append(f"| {b.variant} / {graph} / {name} | {worst[name, 'fp32'][0]:.1e} | {fp16[1]:.1e} | {kl} |")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpts", nargs="*", type=Path, default=DEFAULT)
    parser.add_argument("--repeat", type=int, default=1, help="builds per checkpoint; the fastest is reported")
    parser.add_argument("--parity", action="store_true", help="also measure per-graph parity (fp32 and fp16)")
    args = parser.parse_args(argv)
    parity = []
    print(f"# {platform.processor() or platform.machine()}, Python {platform.python_version()}")
    print(f"# load average before: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("| checkpoint | variant | graphs | build wall (s) | build CPU (s) | FP32 ONNX (MB) | FP16 ONNX (MB) | bundle (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for ckpt in args.ckpts:
            out = Path(tmp) / ckpt.stem
            wall, cpu = min(build_once(ckpt, out) for _ in range(args.repeat))
            s = sizes(out)
            print(f"| {ckpt.name} | {s['variant']} | {s['graphs']} | {wall:.1f} | {cpu:.1f} | {s.get('fp32_mb', 0):.2f} "
                  f"| {s.get('fp16_mb', 0):.2f} | {s['bundle_mb']:.2f} |", flush=True)
            if args.parity:
                parity += graph_parity(ckpt, out)
    if parity:
        print("\n| variant / graph / output | FP32 max rel | FP16 rel L2 | FP16 KL of softmax |")
        print("|---|---|---|---|")
        print("\n".join(parity))
    print(f"# load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
