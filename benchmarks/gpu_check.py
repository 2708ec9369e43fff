"""One prepared GPU session for the torch runtime: CUDA graphs vs eager, overhead, parity, host copies.

    python benchmarks/gpu_check.py                 # on a GPU machine; writes to $OUT (or ./gpu_check_out)
    python benchmarks/gpu_check.py --dry-run       # the same script on the CPU, tiny config (tested in CI)

What it measures (each section is a key of gpu_check.json; a table is printed last):
1. speed: a ~100M-parameter config (training.config PRESETS["base"]: width 768, 12 blocks, 12
   heads; seq_len 128, vocab 8192 + mask, 16 latent slots of 32; random weights; the MDLM
   denoiser has 105M parameters, FUJI's two-stream MM-DiT 197M) for each --variants entry, at
   B = 1 and 64: the runtime's per-step time with the torch backend eager and with CUDA
   graphs (one graph per batch size), the graph's own time per step (replays alone), and
   the sampler overhead = (graphed step - graph replay) / graph replay, and the graphed step
   with float32 instead of float64 categorical draws. Targets: graphs >= 5x faster than
   eager at B = 1; overhead <= 10%.
2. parity: on the shipped tiny examples (examples/sawtooth-*.pt), the runtime sampler on
   CUDA (eager and graphs) vs the CPU reference sampler, same draws: token agreement.
3. host_copies: the sampling loop on CUDA (graphs, B = 64) is run under
   torch.cuda.set_sync_debug_mode("error") (any synchronising op, .item() or a copy to the
   host, raises) and under the profiler, counting device-to-host memcpy events and bytes;
   both must be zero inside the loop.
Precision: fp32 (TF32 off, torch's default), the reference's precision.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtimes.backends.torch_runner import CheckpointModules, TorchRunner  # noqa: E402
from runtimes.bundle import FORMAT, VERSION, Bundle, sha256_file  # noqa: E402
from runtimes.noise import draw_noise  # noqa: E402
from runtimes.samplers import GRAPHS, Sampler  # noqa: E402
from runtimes.spec import graph_specs  # noqa: E402
from training import sampling  # noqa: E402
from training.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from training.config import PRESETS, ModelConfig  # noqa: E402
from training.model import LDDM  # noqa: E402

BASE = dict(seq_len=128, vocab_size=8192, n_latent=16, latent_dim=32, **PRESETS["base"])
DRY = dict(seq_len=16, vocab_size=64, n_latent=2, latent_dim=4, **PRESETS["tiny"])
TARGET_SPEEDUP_B1, TARGET_OVERHEAD = 5.0, 0.10


def checkpoint_bundle(ckpt: Path, out: Path) -> Bundle:
    """A bundle with a manifest and no ONNX files: all the torch backend needs (spec + checkpoint)."""
    model, raw = load_checkpoint(ckpt)
    cfg = model.cfg
    specs = graph_specs(cfg.variant, cfg.seq_len, cfg.n_latent, cfg.latent_dim, cfg.total_vocab)
    manifest = {
        "format": FORMAT, "version": VERSION, "variant": cfg.variant, "config": cfg.to_dict(),
        "shapes": {"L": cfg.seq_len, "P": cfg.n_latent, "D": cfg.latent_dim, "V": cfg.total_vocab,
                   "mask_id": cfg.mask_id},
        "schedule": {"mask": {"kind": cfg.mask_schedule, "eps": cfg.mask_eps},
                     "latent": {"kind": cfg.latent_schedule, "eps": cfg.latent_eps}},
        "graphs": {name: {**spec.to_dict(), "onnx": {}} for name, spec in specs.items()},
        "batch_profile": {"min": 1, "opt": 8, "max": 64}, "opset": 18, "engines": [],
        "tokenizer": raw["tokenizer"], "checkpoint": {"path": str(ckpt.resolve()), "sha256": sha256_file(ckpt)},
        "files": {}, "tools": {"torch": torch.__version__}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return Bundle.open(out)


def make_sampler(bundle: Bundle, device: str, cuda_graph: bool, modules: CheckpointModules | None = None) -> Sampler:
    modules = modules or CheckpointModules(bundle)
    runners = {g: TorchRunner(bundle, g, device, modules, use_cuda_graph=cuda_graph).activate()
               for g in GRAPHS[bundle.variant]}
    return Sampler.from_bundle(bundle, runners)


def noise_for(bundle: Bundle, seed: int, batch: int, steps: int):
    s = bundle.shapes
    return draw_noise(seed, batch, steps, s["L"], None if bundle.variant == "mdlm" else (s["P"], s["D"]))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int) -> float:
    """Median seconds of fn() over `repeat` calls after one warm-up (device synchronised)."""
    fn()
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def graph_replay_seconds(sampler: Sampler, noise, steps: int, device: str, repeat: int) -> float:
    """Seconds per step of the network alone (the runner's infer on fixed inputs, `steps` times)."""
    runner = sampler.runners[GRAPHS[sampler.variant][-1]]
    B, s = noise.batch, sampler.shapes
    feeds = {"x_t": torch.full((B, s["L"]), s["mask_id"], dtype=torch.int64, device=device),
             "y_t": torch.randn(B, s["P"], s["D"], device=device),
             "y0": torch.randn(B, s["P"], s["D"], device=device),
             "t": torch.full((B,), 0.5, device=device)}
    feed = {name: feeds[name] for name in runner.spec.input_names}
    return timed(lambda: [runner.infer(feed) for _ in range(steps)], device, repeat) / steps


def speed(variant: str, cfg: dict, work: Path, device: str, batches: list[int], steps: int, repeat: int) -> list[dict]:
    torch.manual_seed(0)
    model = LDDM(ModelConfig(variant=variant, **cfg))
    # The parameters the sampling loop runs (fuji's MM-DiT has two streams of weights: ~2x mdlm's).
    params = sum(p.numel() for g in GRAPHS[variant] for p in getattr(model, g).parameters())
    ckpt = work / f"{variant}-speed.pt"
    save_checkpoint(ckpt, model, tokenizer=None, train={"note": "random weights for gpu_check"})
    bundle = checkpoint_bundle(ckpt, work / f"{variant}-speed")
    modules = CheckpointModules(bundle)  # one copy of the weights for both modes
    modes = {"eager": make_sampler(bundle, device, False, modules)}
    if device.startswith("cuda"):
        modes["graphs"] = make_sampler(bundle, device, True, modules)
    latent = steps if variant == "seq" else None
    n_steps = steps + (latent or 0)
    rows = []
    for batch in batches:
        noise = noise_for(bundle, 0, batch, steps)
        row = {"variant": variant, "params_M": round(params / 1e6, 1), "batch": batch, "steps": n_steps}
        for mode, sampler in modes.items():
            row[f"{mode}_ms_per_step"] = 1e3 * timed(lambda: sampler.sample(noise, latent), device, repeat) / n_steps
            row[f"{mode}_graph_only_ms_per_step"] = 1e3 * graph_replay_seconds(sampler, noise, steps, device, repeat)
        best = "graphs" if "graphs" in modes else "eager"
        fast_draws = Sampler.from_bundle(bundle, modes[best].runners, float64_draws=False)
        row[f"{best}_float32_draws_ms_per_step"] = 1e3 * timed(lambda: fast_draws.sample(noise, latent),
                                                                device, repeat) / n_steps
        row["speedup_graphs_vs_eager"] = row["eager_ms_per_step"] / row[f"{best}_ms_per_step"]
        graph_ms = row[f"{best}_graph_only_ms_per_step"]
        row["sampler_overhead"] = (row[f"{best}_ms_per_step"] - graph_ms) / graph_ms
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def parity(examples: list[Path], work: Path, device: str, steps: int, batch: int) -> list[dict]:
    """Runtime on `device` (eager, and graphs on CUDA) vs the CPU reference sampler: token agreement."""
    rows = []
    for ckpt in examples:
        bundle = checkpoint_bundle(ckpt, work / f"parity-{ckpt.stem}")
        model, _ = load_checkpoint(ckpt)
        latent = steps if bundle.variant == "seq" else None
        noise = noise_for(bundle, 1, batch, steps)
        draws = {"u": noise.u} if noise.y_init is None else {"u": noise.u, "y_init": noise.y_init}
        reference = {"mdlm": lambda: sampling.sample_mdlm(model, draws, steps),
                     "fuji": lambda: sampling.sample_fuji(model, draws, steps),
                     "seq": lambda: sampling.sample_seq(model, draws, steps, latent)}[bundle.variant]()
        row = {"example": ckpt.name, "batch": batch, "steps": steps}
        for mode in ("eager", "graphs") if device.startswith("cuda") else ("eager",):
            result = make_sampler(bundle, device, mode == "graphs").sample(noise, latent)
            row[f"{mode}_token_agreement"] = (result.tokens.cpu() == reference.tokens).double().mean().item()
            if result.latent is not None:
                row[f"{mode}_latent_max_abs_err"] = (result.latent.cpu() - reference.latent).abs().max().item()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def host_copies(variant: str, cfg: dict, work: Path, device: str, batch: int, steps: int) -> dict:
    """Sync-debug and profiler counts of device-to-host copies inside the sampling loop."""
    if not device.startswith("cuda"):
        return {"checked": False, "why": "no CUDA device (dry run)"}
    bundle = checkpoint_bundle(work / f"{variant}-speed.pt", work / f"{variant}-copies")
    sampler = make_sampler(bundle, device, True)
    latent = steps if variant == "seq" else None
    noise = noise_for(bundle, 2, batch, steps).to(device)  # the one host-to-device copy, up front
    sampler.sample(noise, latent)  # captures the graphs (capture itself synchronises)
    sync(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        sampler.sample(noise, latent)
        sync_error = None
    except RuntimeError as e:
        sync_error = str(e).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        sampler.sample(noise, latent)
        sync(device)
    dtoh = [e.name for e in prof.events() if "DtoH" in e.name or "Device -> Pageable" in e.name
            or "Device -> Pinned" in e.name]
    return {"checked": True, "variant": variant, "batch": batch, "steps": steps,
            "sync_debug_error": sync_error, "dtoh_memcpy_events": len(dtoh), "dtoh_event_names": sorted(set(dtoh)),
            "ok": sync_error is None and not dtoh}


ERRORS: list[str] = []


def section(run, on_error):
    """Run one section; on an exception record it and go on, so one failure loses no other result."""
    try:
        return run()
    except Exception as e:  # a one-shot GPU session: keep every other section's numbers
        import traceback
        ERRORS.append(traceback.format_exc())
        print(f"gpu_check: section failed: {type(e).__name__}: {e}", flush=True)
        return on_error


def markdown(report: dict) -> str:
    lines = [f"# gpu_check ({report['device_name']}, torch {report['torch']}, dry_run={report['dry_run']})", "",
             "| variant | params (M) | B | eager ms/step | graphs ms/step | graph replay ms/step | "
             "graphs vs eager | sampler overhead | float32 draws ms/step |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["speed"]:
        graphs = r.get("graphs_ms_per_step")
        replay = r.get("graphs_graph_only_ms_per_step", r["eager_graph_only_ms_per_step"])
        lines.append(f"| {r['variant']} | {r['params_M']} | {r['batch']} | {r['eager_ms_per_step']:.3f} | "
                     f"{'-' if graphs is None else f'{graphs:.3f}'} | {replay:.3f} | "
                     f"{r['speedup_graphs_vs_eager']:.2f}x | {100 * r['sampler_overhead']:.1f}% | "
                     f"{r.get('graphs_float32_draws_ms_per_step') or r['eager_float32_draws_ms_per_step']:.3f} |")
    lines += ["", "| example | B | steps | token agreement (eager) | token agreement (graphs) |",
              "|---|---:|---:|---:|---:|"]
    for r in report["parity"]:
        lines.append(f"| {r['example']} | {r['batch']} | {r['steps']} | {r['eager_token_agreement']:.4f} | "
                     f"{r.get('graphs_token_agreement', float('nan')):.4f} |")
    hc = report["host_copies"]
    lines += ["", f"host copies in the loop: {json.dumps(hc)}", "", f"targets: {json.dumps(report['targets'])}",
              f"errors: {len(report['errors'])} (tracebacks in gpu_check.json)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny config on the CPU (tests the script)")
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"), help="output folder [$OUT]")
    parser.add_argument("--variants", default="mdlm,fuji", help="variants of the speed section")
    parser.add_argument("--batches", default="1,64", help="batch sizes of the speed section")
    parser.add_argument("--steps", type=int, default=16, help="token steps per sampling call")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per measurement (median)")
    args = parser.parse_args(argv)
    ERRORS.clear()
    device = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no CUDA GPU; run it on a GPU machine or pass --dry-run")
    if args.dry_run:
        torch.set_num_threads(1)  # a shared 2-core CI machine: more threads only spin
    cfg, steps = (DRY, 2) if args.dry_run else (BASE, args.steps)
    batches = [int(b) for b in args.batches.split(",")]
    variants = args.variants.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    examples = sorted((ROOT / "examples").glob("sawtooth-*.pt"))
    examples = [p for p in examples if p.name.count(".") == 1]  # not the trainer's *.resume.pt
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        report = {"dry_run": args.dry_run, "torch": torch.__version__, "cuda": torch.version.cuda,
                  "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                  "config": cfg, "targets": {"speedup_b1": TARGET_SPEEDUP_B1, "overhead": TARGET_OVERHEAD}}
        report["speed"] = [row for v in variants
                           for row in section(lambda: speed(v, cfg, work, device, batches, steps, args.repeat), [])]
        report["parity"] = section(lambda: parity(examples[:1] if args.dry_run else examples, work, device,
                                                  4 if args.dry_run else 8, 4 if args.dry_run else 64), [])
        report["host_copies"] = section(lambda: host_copies(variants[0], cfg, work, device, max(batches), steps),
                                        {"checked": True, "ok": False})
        report["errors"] = ERRORS
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    table = markdown(report)
    (out / "gpu_check.md").write_text(table + "\n")
    print(table)
    if report["errors"]:
        sys.exit(f"gpu_check: {len(report['errors'])} section(s) failed (tracebacks in gpu_check.json)")
    if report["host_copies"]["checked"] and not report["host_copies"]["ok"]:
        sys.exit("gpu_check: the sampling loop synchronised or copied to the host (see host_copies above)")
    return report


if __name__ == "__main__":
    main()
