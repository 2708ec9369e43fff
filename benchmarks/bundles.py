"""The benchmarks' bundles: built once under a folder by lddm_export.build, rebuilt when they no
longer fit the run (the one helper of runtime_bench.py, sparse_head.py, int8.py and prompted.py)."""
from __future__ import annotations

import json
from pathlib import Path

from lddm_export.build import DEFAULT_OPSET, build_bundle, parse_options
from runtimes.bundle import Bundle
from runtimes.fileio import sha256_file


def benchmark_bundle(ckpt: Path, bundles: Path, precisions: tuple[str, ...] = ("fp32",), batch_max: int = 64) -> Bundle:
    """The bundle of `ckpt` at `bundles`/<ckpt stem> (no engines), built when it is missing or does
    not fit: another checkpoint, opset or set of precisions, or a batch profile below `batch_max`."""
    out = Path(bundles) / Path(ckpt).stem
    manifest = out / "manifest.json"
    old = json.loads(manifest.read_text()) if manifest.is_file() else None
    fits = old and (old["checkpoint"]["sha256"] == sha256_file(ckpt) and old["opset"] == DEFAULT_OPSET
                    and {p for g in old["graphs"].values() for p in g["onnx"]} == set(precisions)
                    and old["batch_profile"]["max"] >= batch_max)
    if not fits:
        print(f"building {out} ...", flush=True)
        options = parse_options(",".join(precisions), engines="off", batch=f"1,{min(8, batch_max)},{batch_max}",
                                force=True)
        build_bundle(ckpt, out, options, log=lambda line: print("  " + line, flush=True))
    return Bundle.open(out)
