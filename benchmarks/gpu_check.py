"""One prepared GPU session for the torch runtime: CUDA graphs vs eager, overhead, parity, host copies.

    python benchmarks/gpu_check.py                 # on a GPU machine; writes to $OUT (or ./gpu_check_out)
    python benchmarks/gpu_check.py --dry-run       # the same script on the CPU, tiny config (tested in CI)

What it measures (each section is a key of gpu_check.json, written again after every
section; a table is printed last):
1. speed: a ~100M-parameter config (training.config PRESETS["base"]: width 768, 12 blocks, 12
   heads; seq_len 128, vocab 8192 + mask, 16 latent slots of 32; random weights; the MDLM
   denoiser has 105M parameters, FUJI's two-stream MM-DiT 197M) for each --variants entry, at
   each --batches size, the runtime's per-step time with the torch backend in each --modes
   entry (MODES below: eager, CUDA graphs, torch.compile'd CUDA graphs, in FP32 and in FP16
   autocast), the graph's own time per step (replays alone), the sampler overhead =
   (step - graph replay) / graph replay, and the best FP32 mode with float32 instead of
   float64 categorical draws. Targets: the best graphed mode >= 5x faster than eager of the
   same precision at B = 1; overhead <= 10%.
2. parity: on the shipped tiny examples (examples/sawtooth-*.pt), the runtime sampler on
   CUDA in every mode vs the CPU reference sampler, same draws: token agreement.
3. host_copies: the sampling loop on CUDA (dense head, the last graphed mode, B = max --batches)
   is run under torch.cuda.set_sync_debug_mode("error") (any synchronising op, .item() or a copy
   to the host, raises) and under the profiler, counting device-to-host memcpy events; both
   must be zero inside the loop. (The sparse head reads each step's row count back: one sync
   per token step, by design.)
4. sparse: issue 13's comparison on the GPU, dense vs sparse head (docs/design.md, "The sparse
   head") for each --sparse-models entry (the edge-shaped MDLM of benchmarks/sparse_head.py, V =
   32768, width 256, 4 blocks, random weights; the shipped text examples) at each --sparse-batches
   size and --sparse-steps count, in each --sparse-modes entry: ms per call, samples/s, tokens
   differing between the heads, and the sparse sampler's time outside the graphs. With CUDA
   graphs the sampler pads the head's rows to a power of two, so a few captured graphs replay.
Order: the B = 1 speed rows, parity, host copies, sparse, then the larger batches; a section that
would start after --budget-s seconds is skipped and recorded as skipped, so a time-limited
GPU session still returns the most important numbers.
FP32 means TF32 off (torch's default), the reference's precision.
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
from typing import NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.sparse_head import EDGE, edge_checkpoint  # noqa: E402
from lddm_export.bench import sampler_overhead  # noqa: E402
from lddm_export.manifest import new_manifest  # noqa: E402
from runtimes.backends.torch_runner import CheckpointModules, TorchRunner  # noqa: E402
from runtimes.bundle import Bundle, sha256_file  # noqa: E402
from runtimes.noise import draw_noise, latent_shape  # noqa: E402
from runtimes.options import MAX_STEPS, OptionError, parse_int_list  # noqa: E402
from runtimes.samplers import Sampler, sampler_graphs  # noqa: E402
from runtimes.schedules import latent_steps_for  # noqa: E402
from runtimes.spec import graph_specs  # noqa: E402
from training import sampling  # noqa: E402
from training.checkpoint import load_checkpoint, load_reference_graphs, save_checkpoint  # noqa: E402
from training.config import PRESETS, ModelConfig  # noqa: E402
from training.model import LDDM  # noqa: E402

BASE = dict(seq_len=128, vocab_size=8192, n_latent=16, latent_dim=32, **PRESETS["base"])
DRY = dict(seq_len=16, vocab_size=64, n_latent=2, latent_dim=4, **PRESETS["tiny"])
TARGET_SPEEDUP_B1, TARGET_OVERHEAD = 5.0, 0.10
BATCH_PROFILE = {"min": 1, "opt": 8, "max": 64}   # of every bundle this script makes


def checkpoint_bundle(ckpt: Path, out: Path) -> Bundle:
    """A bundle with a manifest and no ONNX files: all the torch backend needs (spec + checkpoint)."""
    model, raw = load_checkpoint(ckpt)
    cfg = model.cfg
    specs = graph_specs(cfg.variant, cfg.seq_len, cfg.n_latent, cfg.latent_dim, cfg.total_vocab, cfg.width,
                        cfg.prompt_latent)
    graphs = {name: {**spec.to_dict(), "onnx": {}} for name, spec in specs.items()}
    manifest = new_manifest(raw["config"], raw["tokenizer"], raw["train"].get("data"), ckpt, sha256_file(ckpt),
                            graphs, BATCH_PROFILE, opset=18)
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return Bundle.open(out)


class Mode(NamedTuple):
    """One way of running the torch backend."""

    cuda_graph: bool
    compile: bool
    precision: str


MODES = {
    "eager": Mode(False, False, "fp32"),
    "graphs": Mode(True, False, "fp32"),
    "compiled": Mode(True, True, "fp32"),
    "eager_fp16": Mode(False, False, "fp16"),
    "compiled_fp16": Mode(True, True, "fp16"),
}


def make_sampler(bundle: Bundle, device: str, mode: Mode, modules: CheckpointModules | None = None,
                 head: str = "dense", **options) -> Sampler:
    """The runtime sampler with `head` on the torch backend in `mode` (CUDA graphs only on a CUDA
    device); a compiled mode compiles the sampler's dense token step too."""
    modules = modules or CheckpointModules(bundle, load_reference_graphs)
    graphed = mode.cuda_graph and device.startswith("cuda")
    runners = {g: TorchRunner(bundle, g, device, modules, use_cuda_graph=graphed, precision=mode.precision,
                              compile=mode.compile).activate()
               for g in sampler_graphs(bundle.variant, head)}
    return Sampler.from_bundle(bundle, runners, head=head, compile=mode.compile, **options)


def baseline_of(mode_name: str) -> str:
    """The eager mode of the same precision: what a mode's speedup is measured against."""
    return "eager_fp16" if MODES[mode_name].precision == "fp16" else "eager"


def noise_for(bundle: Bundle, seed: int, batch: int, steps: int):
    s = bundle.shapes
    return draw_noise(seed, batch, steps, s["L"], latent_shape(bundle.variant, s))


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
    runner = sampler.runners[sampler_graphs(sampler.variant, "dense")[-1]]
    B, s = noise.batch, sampler.shapes
    feeds = {"x_t": torch.full((B, s["L"]), s["mask_id"], dtype=torch.int64, device=device),
             "y_t": torch.randn(B, s["P"], s["D"], device=device),
             "y0": torch.randn(B, s["P"], s["D"], device=device),
             "t": torch.full((B,), 0.5, device=device)}
    feed = {name: feeds[name] for name in runner.spec.input_names}
    return timed(lambda: [runner.infer(feed) for _ in range(steps)], device, repeat) / steps


def speed_checkpoint(variant: str, cfg: dict, work: Path) -> Path:
    """The random-weight checkpoint of the speed section (made once per variant)."""
    ckpt = work / f"{variant}-speed.pt"
    if not ckpt.exists():
        torch.manual_seed(0)
        save_checkpoint(ckpt, LDDM(ModelConfig(variant=variant, **cfg)), tokenizer=None,
                        train={"note": "random weights for gpu_check"})
    return ckpt


def speed(variant: str, cfg: dict, work: Path, device: str, batch: int, modes: list[str], steps: int,
          repeat: int) -> dict:
    """One row: per-step times of every mode at one batch size, speedups and overheads."""
    ckpt = speed_checkpoint(variant, cfg, work)
    bundle = checkpoint_bundle(ckpt, work / f"{variant}-speed")
    modules = CheckpointModules(bundle, load_reference_graphs)  # one copy of the weights for every mode
    model = modules()
    # The parameters the sampling loop runs (fuji's MM-DiT has two streams of weights: ~2x mdlm's).
    params = sum(p.numel() for g in sampler_graphs(variant, "dense") for p in model[g].parameters())
    latent = latent_steps_for(variant, steps)
    n_steps = steps + (latent or 0)
    noise = noise_for(bundle, 0, batch, steps)
    row = {"variant": variant, "params_M": round(params / 1e6, 1), "batch": batch, "steps": n_steps}
    samplers = {}
    for name in modes:
        start = time.perf_counter()
        samplers[name] = sampler = make_sampler(bundle, device, MODES[name], modules)
        sampler.sample(noise, latent)  # compiles and captures (not timed)
        row[f"{name}_setup_s"] = time.perf_counter() - start
        row[f"{name}_ms_per_step"] = 1e3 * timed(lambda: sampler.sample(noise, latent), device, repeat) / n_steps
        row[f"{name}_graph_only_ms_per_step"] = 1e3 * graph_replay_seconds(sampler, noise, steps, device, repeat)
        row[f"{name}_overhead"] = (row[f"{name}_ms_per_step"] - row[f"{name}_graph_only_ms_per_step"]) \
            / row[f"{name}_graph_only_ms_per_step"]
        if baseline_of(name) in samplers:
            row[f"{name}_speedup"] = row[f"{baseline_of(name)}_ms_per_step"] / row[f"{name}_ms_per_step"]
        print(f"  {variant} B={batch} {name}: {row[f'{name}_ms_per_step']:.3f} ms/step "
              f"(setup {row[f'{name}_setup_s']:.1f} s)", flush=True)
    fp32 = [m for m in modes if MODES[m].precision == "fp32"]
    best = min(fp32, key=lambda m: row[f"{m}_ms_per_step"])
    fast_draws = Sampler.from_bundle(bundle, samplers[best].runners, head="dense", float64_draws=False,
                                      compile=MODES[best].compile)
    row["best_fp32_mode"] = best
    row["best_fp32_float32_draws_ms_per_step"] = 1e3 * timed(lambda: fast_draws.sample(noise, latent),
                                                             device, repeat) / n_steps
    print(json.dumps(row), flush=True)
    return row


def parity(examples: list[Path], work: Path, device: str, modes: list[str], steps: int, batch: int) -> list[dict]:
    """Runtime on `device` in every mode vs the CPU reference sampler: token agreement."""
    rows = []
    for ckpt in examples:
        bundle = checkpoint_bundle(ckpt, work / f"parity-{ckpt.stem}")
        model, _ = load_checkpoint(ckpt)
        latent = latent_steps_for(bundle.variant, steps)
        noise = noise_for(bundle, 1, batch, steps)
        reference = sampling.sample_call(model, noise, latent)
        row = {"example": ckpt.name, "batch": batch, "steps": steps}
        modules = CheckpointModules(bundle, load_reference_graphs)
        for mode in modes:
            result = make_sampler(bundle, device, MODES[mode], modules).sample(noise, latent)
            row[f"{mode}_token_agreement"] = (result.tokens.cpu() == reference.tokens).double().mean().item()
            if result.latent is not None:
                row[f"{mode}_latent_max_abs_err"] = (result.latent.cpu() - reference.latent).abs().max().item()
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def host_copies(variant: str, cfg: dict, work: Path, device: str, mode: str, batch: int, steps: int) -> dict:
    """Sync-debug and profiler counts of device-to-host copies inside the sampling loop."""
    if not device.startswith("cuda"):
        return {"checked": False, "why": "no CUDA device (dry run)"}
    bundle = checkpoint_bundle(speed_checkpoint(variant, cfg, work), work / f"{variant}-copies")
    sampler = make_sampler(bundle, device, MODES[mode])
    latent = latent_steps_for(variant, steps)
    noise = noise_for(bundle, 2, batch, steps).to(device)  # the one host-to-device copy, up front
    sampler.sample(noise, latent)  # compiles and captures the graphs (capture itself synchronises)
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
    return {"checked": True, "variant": variant, "mode": mode, "batch": batch, "steps": steps,
            "sync_debug_error": sync_error, "dtoh_memcpy_events": len(dtoh), "dtoh_event_names": sorted(set(dtoh)),
            "ok": sync_error is None and not dtoh}


def sparse_vs_dense(model: str, bundle: Bundle, modules: CheckpointModules, device: str, mode: str, batch: int,
                    steps: int, repeat: int) -> dict:
    """One row of the sparse section: both heads on the same noise in `mode`."""
    latent = latent_steps_for(bundle.variant, steps)
    noise = noise_for(bundle, 0, batch, steps)
    samplers = {head: make_sampler(bundle, device, MODES[mode], modules, head=head) for head in ("dense", "sparse")}
    tokens = {head: sampler.sample(noise, latent).tokens.cpu() for head, sampler in samplers.items()}  # captures
    seconds = {head: timed(lambda sampler=sampler: sampler.sample(noise, latent), device, repeat)
               for head, sampler in samplers.items()}
    overhead = sampler_overhead(bundle, samplers["sparse"].runners, noise, latent, lambda: sync(device),
                                head="sparse")
    row = {"model": model, "variant": bundle.variant, "V": bundle.shapes["V"], "mode": mode, "batch": batch,
           "steps": steps, "dense_ms": 1e3 * seconds["dense"], "sparse_ms": 1e3 * seconds["sparse"],
           "dense_samples_per_s": batch / seconds["dense"], "sparse_samples_per_s": batch / seconds["sparse"],
           "speedup": seconds["dense"] / seconds["sparse"], "sparse_sampler_overhead": overhead,
           "tokens_differing": int((tokens["dense"] != tokens["sparse"]).sum())}
    print(json.dumps(row), flush=True)
    return row


def sparse_model(model: str, work: Path, dry_run: bool) -> tuple[Bundle, CheckpointModules]:
    """The sparse section's bundle and weights of `model`: the edge-shaped MDLM (tiny on a dry run)
    or a shipped example."""
    ckpt = edge_checkpoint(work / "edge-mdlm.pt", DRY if dry_run else EDGE) if model == "edge-mdlm" \
        else ROOT / "examples" / f"{model}.pt"
    bundle = checkpoint_bundle(ckpt, work / f"sparse-{model}")
    return bundle, CheckpointModules(bundle, load_reference_graphs)


def sparse_section_cells(args) -> list[tuple[str, str, int, int]]:
    """(model, mode, B, T) of every sparse-section row, checked; a dry run's: the tiny edge-mdlm at
    B = 1, 2 and T = 2, in each --sparse-modes entry."""
    models = ["edge-mdlm"] if args.dry_run else args.sparse_models.split(",")
    shipped = {path.stem for path in (ROOT / "examples").glob("*.pt")}
    if missing := [m for m in models if m != "edge-mdlm" and m not in shipped]:
        sys.exit(f"gpu_check: --sparse-models {missing} are neither edge-mdlm nor examples/<name>.pt; "
                 f"name shipped examples, e.g. text-mdlm")
    try:
        batches = [1, 2] if args.dry_run else parse_int_list("--sparse-batches", args.sparse_batches, 1, BATCH_PROFILE["max"],
                                                             "batch sizes separated by commas, e.g. 1,32")
        steps = [2] if args.dry_run else parse_int_list("--sparse-steps", args.sparse_steps, 1, MAX_STEPS,
                                                        "token step counts separated by commas")
    except OptionError as e:
        sys.exit(f"gpu_check: {e}")
    return [(model, mode, b, t) for model in models for mode in args.sparse_modes.split(",")
            for b in batches for t in steps]


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
             "| variant | params (M) | B | mode | ms/step | graph replay ms/step | sampler overhead | "
             "vs eager (same precision) | setup s |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in report["speed"]:
        for mode in report["modes"]:
            if f"{mode}_ms_per_step" not in r:
                continue
            speedup = r.get(f"{mode}_speedup")
            lines.append(f"| {r['variant']} | {r['params_M']} | {r['batch']} | {mode} | {r[f'{mode}_ms_per_step']:.3f} | "
                         f"{r[f'{mode}_graph_only_ms_per_step']:.3f} | {100 * r[f'{mode}_overhead']:.1f}% | "
                         f"{'-' if speedup is None else f'{speedup:.2f}x'} | {r[f'{mode}_setup_s']:.1f} |")
    for r in report["speed"]:
        lines.append(f"\n{r['variant']} B={r['batch']}: {r['best_fp32_mode']} with float32 draws "
                     f"{r['best_fp32_float32_draws_ms_per_step']:.3f} ms/step")
    lines += ["", "| example | B | steps | " + " | ".join(f"tokens ({m})" for m in report["modes"]) + " |",
              "|---|---:|---:|" + "---:|" * len(report["modes"])]
    for r in report["parity"]:
        lines.append(f"| {r['example']} | {r['batch']} | {r['steps']} | "
                     + " | ".join(f"{r.get(f'{m}_token_agreement', float('nan')):.4f}" for m in report["modes"]) + " |")
    lines += ["", "| model | mode | B | T | dense ms/call | sparse ms/call | speedup | sparse: time outside graphs | "
              "tokens differing |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report.get("sparse", []):  # absent from the reports of runs before the section existed
        lines.append(f"| {r['model']} | {r['mode']} | {r['batch']} | {r['steps']} | {r['dense_ms']:.2f} | "
                     f"{r['sparse_ms']:.2f} | {r['speedup']:.2f}x | {100 * r['sparse_sampler_overhead']:.1f}% | "
                     f"{r['tokens_differing']} |")
    hc = report["host_copies"]
    lines += ["", f"host copies in the loop: {json.dumps(hc)}", "", f"targets: {json.dumps(report['targets'])}",
              f"skipped for time: {report['skipped']}", f"errors: {len(report['errors'])} (tracebacks in gpu_check.json)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny config on the CPU (tests the script)")
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"), help="output folder [$OUT]")
    parser.add_argument("--variants", default="mdlm,fuji", help="variants of the speed section")
    parser.add_argument("--batches", default="1,64", help="batch sizes of the speed section")
    parser.add_argument("--modes", default=",".join(MODES), help=f"torch backend modes, of {', '.join(MODES)}")
    parser.add_argument("--steps", type=int, default=16, help="token steps per sampling call")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per measurement (median)")
    parser.add_argument("--sparse-models", default="edge-mdlm,text-mdlm,text-fuji,text-seq",
                        help="models of the sparse section (edge-mdlm, or examples/<name>.pt)")
    parser.add_argument("--sparse-modes", default="eager,graphs", help="torch backend modes of the sparse section")
    parser.add_argument("--sparse-batches", default="1,32", help="batch sizes of the sparse section")
    parser.add_argument("--sparse-steps", default="4,16,64", help="token steps of the sparse section")
    parser.add_argument("--budget-s", type=float, default=480.0, help="start no section after this many seconds")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    ERRORS.clear()
    device = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check: torch sees no CUDA GPU; run it on a GPU machine or pass --dry-run")
    if args.dry_run:
        torch.set_num_threads(1)  # a shared 2-core CI machine: more threads only spin
    # Static shapes: every (graph, batch, precision) is one more compilation of the same forward code.
    torch._dynamo.config.recompile_limit = 64
    cfg, steps = (DRY, 2) if args.dry_run else (BASE, args.steps)
    batches = [int(b) for b in args.batches.split(",")]
    sparse_cells = sparse_section_cells(args)
    variants, modes = args.variants.split(","), args.modes.split(",")
    if unknown := sorted((set(modes) | {mode for _, mode, _, _ in sparse_cells}) - set(MODES)):
        sys.exit(f"gpu_check: unknown --modes or --sparse-modes {unknown}; choose from {', '.join(MODES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    examples = sorted((ROOT / "examples").glob("sawtooth-*.pt"))
    examples = [p for p in examples if p.name.count(".") == 1]  # not the trainer's *.resume.pt
    report = {"dry_run": args.dry_run, "torch": torch.__version__, "cuda": torch.version.cuda,
              "device_name": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "config": cfg, "modes": modes, "targets": {"speedup_b1": TARGET_SPEEDUP_B1, "overhead": TARGET_OVERHEAD},
              "speed": [], "parity": [], "host_copies": {"checked": False, "why": "not run"}, "sparse": [], "skipped": [],
              "errors": ERRORS}

    def save():
        (out / "gpu_check.json").write_text(json.dumps(report, indent=2))

    def within_budget(what: str) -> bool:
        if time.perf_counter() - began < args.budget_s:
            return True
        report["skipped"].append(what)
        return False

    graphed = [m for m in modes if MODES[m].cuda_graph] or modes
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        def speed_rows(batch_sizes: list[int]) -> None:
            for b in batch_sizes:
                for v in variants:
                    if within_budget(f"speed {v} B={b}"):
                        report["speed"] += section(lambda: [speed(v, cfg, work, device, b, modes, steps,
                                                                  args.repeat)], [])
                        save()

        speed_rows(batches[:1])
        if within_budget("parity"):
            report["parity"] = section(lambda: parity(examples[:1] if args.dry_run else examples, work, device, modes,
                                                      4 if args.dry_run else 8, 4 if args.dry_run else 64), [])
            save()
        if within_budget("host copies"):
            report["host_copies"] = section(lambda: host_copies(variants[0], cfg, work, device, graphed[-1],
                                                                max(batches), steps), {"checked": True, "ok": False})
            save()
        loaded = {}  # model -> (bundle, weights): loaded once for all of its cells
        for model, mode, b, t in sparse_cells:
            if within_budget(f"sparse {model} {mode} B={b} T={t}"):
                def row():
                    if model not in loaded:
                        loaded[model] = sparse_model(model, work, args.dry_run)
                    return [sparse_vs_dense(model, *loaded[model], device, mode, b, t, args.repeat)]
                report["sparse"] += section(row, [])
                save()
        speed_rows(batches[1:])
    report["wall_s"] = time.perf_counter() - began
    save()
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
