"""`lddm-export inspect DIR`: a bundle's manifest as readable tables.

Reads manifest.json without torch (it runs on a Jetson too) and checks every file's sha256:
the tables are printed either way, and a bundle with a file missing or changed exits 1.
"""
from __future__ import annotations

from pathlib import Path

import click

from lddm_export import manifest as manifests
from runtimes.errors import BundleError


def table(rows: list[list], header: list[str] | None = None) -> str:
    """Left-aligned columns, two spaces apart; a rule under the header where there is one."""
    rows = ([header] if header else []) + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    if header:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _tensors(specs: list[dict]) -> str:
    return ", ".join(f"{s['name']} {s['dtype']}[{','.join(str(d) for d in s['shape'])}]" for s in specs)


def _size(root: Path, rel: str) -> str:
    path = root / rel
    return f"{path.stat().st_size / 1e6:.2f} MB" if path.is_file() else "missing"


def describe(root: Path, m: dict, changed: list[str] | None = None) -> str:
    """The whole report for one bundle, as text; `changed`: manifests.changed_files, if known."""
    s, sched, prof, ckpt = m["shapes"], m["schedule"], m["batch_profile"], m["checkpoint"]
    tok = m["tokenizer"]
    summary = [
        ["variant", m["variant"]],
        ["shapes", f"L={s['L']} P={s['P']} D={s['D']} V={s['V']} W={s['W']} mask_id={s['mask_id']}"],
        ["sparse head", f"{m['head']} (log-probs only where tokens unmask)"],
        ["schedule", f"mask {sched['mask']['kind']} (eps {sched['mask']['eps']}), "
                     f"latent {sched['latent']['kind']} (eps {sched['latent']['eps']})"],
        ["opset", m.get("opset", "?")],
        ["batch profile", f"min {prof['min']}, opt {prof['opt']}, max {prof['max']}"],
        ["checkpoint", f"{ckpt.get('path')} (sha256 {str(ckpt.get('sha256'))[:12]})"],
        ["tokenizer", tok.get("kind", "?") if isinstance(tok, dict) else "none (synthetic data)"],
        ["fp16 calibration", "yes: extra FP32 islands from sampling-trajectory statistics"
                             if m.get("fp16_calibration") else "no: FP32 islands by rule only"],
    ]
    graphs = [[name, _tensors(g["inputs"]), _tensors(g["outputs"]),
               "; ".join(f"{p}: {rel} ({_size(root, rel)})" for p, rel in g["onnx"].items())]
              for name, g in m["graphs"].items()]
    engines = [[e["graph"], e["precision"], f"{e['file']} ({_size(root, e['file'])})", e["trt_version"],
                f"{e['gpu_name']} (sm {e['compute_capability']})",
                f"{e['profile']['min']}/{e['profile']['opt']}/{e['profile']['max']}"] for e in m["engines"]]
    islands = [[name, d["node"], d["op_type"], d["reason"]]
               for name, g in m["graphs"].items() for d in g.get("fp16_islands", [])]
    changed = manifests.changed_files(root, m) if changed is None else changed
    files = (f"{len(m['files'])} files, all match their sha256" if not changed
             else f"{len(changed)} of {len(m['files'])} files missing or changed since the build: {changed}")
    parts = [f"bundle {root}", table(summary),
             "", table(graphs, ["graph", "inputs", "outputs", "onnx"]),
             *(["", table(islands, ["graph", "calibrated FP32 island", "op", "why"])] if islands else []),
             "", table(engines, ["engine", "precision", "file", "tensorrt", "gpu", "profile"]) if engines
             else "engines: none (build them with `lddm-export build --bundle DIR --engines on`)",
             "", table([[k, v] for k, v in m["tools"].items()], ["tool", "version"]),
             "", files]
    return "\n".join(parts)


@click.command(help="Show a bundle's manifest as tables (variant, shapes, graphs, engines, checkpoint, tools) "
                    "and check every file's sha256: exit 1 if one is missing or changed.")
@click.argument("bundle", type=click.Path(path_type=Path))
def command(bundle):
    manifest = manifests.read_manifest(bundle)
    changed = manifests.changed_files(bundle, manifest)
    click.echo(describe(bundle, manifest, changed))
    if changed:
        raise BundleError(f"bundle {bundle}: {len(changed)} of {len(manifest['files'])} files are missing or "
                          f"changed since the build ({', '.join(changed)}); rebuild it with lddm-export build")
