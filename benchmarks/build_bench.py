"""Build time and artifact sizes of `lddm-export build` (ONNX FP32 + FP16, no engines).

    python benchmarks/build_bench.py [CKPT ...] [--repeat N]

Default checkpoints: examples/sawtooth-{mdlm,fuji,seq}.pt. Each build runs as a user runs it,
`lddm-export build --ckpt CKPT --out DIR --engines off --force` in a fresh process (interpreter
start and imports included), into a temporary directory; the best of --repeat runs is kept.
Prints a Markdown table: wall time, and the bytes of every ONNX file and of the whole bundle.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = [ROOT / "examples" / f"sawtooth-{v}.pt" for v in ("mdlm", "fuji", "seq")]


def build_once(ckpt: Path, out: Path) -> float:
    """Wall seconds of one `lddm-export build` subprocess; raises if it fails."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lddm_export.cli", "build", "--ckpt", str(ckpt), "--out", str(out),
                    "--engines", "off", "--force"], check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - started


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpts", nargs="*", type=Path, default=DEFAULT)
    parser.add_argument("--repeat", type=int, default=1, help="builds per checkpoint; the fastest is reported")
    args = parser.parse_args(argv)
    print(f"# {platform.processor() or platform.machine()}, Python {platform.python_version()}")
    print("| checkpoint | variant | graphs | build (s) | FP32 ONNX (MB) | FP16 ONNX (MB) | bundle (MB) |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for ckpt in args.ckpts:
            out = Path(tmp) / ckpt.stem
            seconds = min(build_once(ckpt, out) for _ in range(args.repeat))
            s = sizes(out)
            print(f"| {ckpt.name} | {s['variant']} | {s['graphs']} | {seconds:.1f} | {s.get('fp32_mb', 0):.2f} "
                  f"| {s.get('fp16_mb', 0):.2f} | {s['bundle_mb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
