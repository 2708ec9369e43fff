"""`lddm-export bench`: per-step latency and samples/s of the runtime vs the torch eager reference.

    lddm-export bench --bundle DIR --backend ort --batch 1,32 --steps 16 [--json FILE]

For each batch size B, one sampling call of T_x token steps (plus T_y latent steps for seq)
is timed on the runtime (the backend's runners inside runtimes.samplers) and on the reference
sampler of training/sampling.py with the checkpoint's eager torch modules, both fed the same
draws. Each side gets one warm-up call, then the two are called alternately --repeat times
(so both see the same machine load) and the medians are reported:
    ms/step   = call time / (T_x + T_y)
    samples/s = B / call time
    sampler overhead = (call time - time inside the graphs) / time inside the graphs, from one
                       more runtime call with every infer() timed (and synchronised on a GPU)
The torch threads and the onnxruntime intra-op threads are both set to --threads, so the
comparison is fair on a shared CPU.
"""
from __future__ import annotations

import statistics
import time

import click

from lddm_export.commands.numbers import Int
from runtimes.errors import LddmError
from runtimes.fileio import check_input_file, check_target, write_json
from runtimes.options import MAX_BATCH, MAX_STEPS, MAX_THREADS, check_job, parse_int_list

MAX_REPEAT = 1000


def paired_median_seconds(fn_a, fn_b, repeat: int) -> tuple[float, float]:
    """Median wall times (seconds) of fn_a() and fn_b() over `repeat` alternating calls each.

    One warm-up call of each first. Alternating the two puts both under the same load, which
    matters on a shared machine.
    """
    fn_a()
    fn_b()
    times_a, times_b = [], []
    for _ in range(repeat):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times_a), statistics.median(times_b)


class TimedRunner:
    """Wraps a runner and adds up the wall time spent in its infer() (device synchronised)."""

    def __init__(self, runner, sync):
        self.runner, self.sync, self.seconds = runner, sync, 0.0
        self.device, self.spec = runner.device, runner.spec

    def infer(self, feed):
        start = time.perf_counter()
        out = self.runner.infer(feed)
        self.sync()
        self.seconds += time.perf_counter() - start
        return out


def bench_bundle(bundle, backend: str, precision: str, device: str, batches: list[int], steps: int,
                 latent_steps: int | None, repeat: int, threads: int | None, ckpt=None,
                 cuda_graph: bool | None = None, compile: bool = False) -> list[dict]:
    """Time the runtime and the reference sampler on one bundle.

    Args:
        bundle: an opened runtimes.bundle.Bundle.
        backend, precision, device: the runtime under test (as for make_runners).
        batches: batch sizes B; steps: T_x; latent_steps: T_y (seq; None defaults to steps).
        repeat: timed calls per measurement (median reported); threads: CPU threads, or None.
        ckpt: an explicit checkpoint for the reference, or None for the manifest's.
        cuda_graph: the runners' CUDA-graph option (as for make_runners).
        compile: torch.compile the sampler's token step, and the modules of the torch backend.
    Returns:
        one row per batch: {"variant", "backend", "precision", "device", "batch", "steps",
        "runtime_ms_per_step", "runtime_samples_per_s", "reference_ms_per_step",
        "reference_samples_per_s", "speedup", "sampler_overhead"}; sampler_overhead is the
        time outside the graphs over the time inside them, from one more (instrumented) call.
    """
    import torch

    from runtimes.backends import make_runners
    from runtimes.backends.torch_runner import CheckpointModules
    from runtimes.noise import draw_noise
    from runtimes.samplers import GRAPHS, Sampler
    from runtimes.schedules import latent_steps_for
    from training import sampling
    from training.checkpoint import load_checkpoint

    if threads is not None:
        torch.set_num_threads(threads)
    variant, shapes = bundle.variant, bundle.shapes
    latent_steps = latent_steps_for(variant, steps, latent_steps)
    n_steps = steps + (latent_steps or 0)
    max_batch = bundle.manifest["batch_profile"]["max"]
    if max(batches) > max_batch:
        raise LddmError(f"--batch {max(batches)} is above the bundle's batch profile maximum {max_batch}; "
                        f"bench batches <= {max_batch} or rebuild with a larger --batch")
    check_job(max(batches), max(batches), steps, latent_steps, shapes)
    runners = make_runners(bundle, backend, precision, device, ckpt=ckpt, graphs=list(GRAPHS[variant]),
                           threads=threads, cuda_graph=cuda_graph, compile=compile and backend == "torch")
    for runner in runners.values():
        runner.activate()
    sampler = Sampler.from_bundle(bundle, runners, compile=compile)
    model, _ = load_checkpoint(CheckpointModules(bundle, ckpt).checkpoint_path())
    model = model.to(device)
    reference = {"mdlm": lambda d: sampling.sample_mdlm(model, d, steps),
                 "fuji": lambda d: sampling.sample_fuji(model, d, steps),
                 "seq": lambda d: sampling.sample_seq(model, d, steps, latent_steps)}[variant]
    rows = []
    for batch in batches:
        noise = draw_noise(0, batch, steps, shapes["L"], None if variant == "mdlm" else (shapes["P"], shapes["D"]))
        draws = {"u": noise.u} if noise.y_init is None else {"u": noise.u, "y_init": noise.y_init}
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

        def run_runtime():
            sampler.sample(noise, latent_steps)
            sync()

        def run_reference():
            reference(draws)
            sync()

        t_runtime, t_reference = paired_median_seconds(run_runtime, run_reference, repeat)
        timed = {name: TimedRunner(runner, sync) for name, runner in runners.items()}
        start = time.perf_counter()
        Sampler.from_bundle(bundle, timed, compile=compile).sample(noise, latent_steps)
        sync()
        t_total, t_graphs = time.perf_counter() - start, sum(r.seconds for r in timed.values())
        rows.append({"variant": variant, "backend": backend, "precision": precision, "device": device,
                     "batch": batch, "steps": n_steps,
                     "runtime_ms_per_step": 1e3 * t_runtime / n_steps, "runtime_samples_per_s": batch / t_runtime,
                     "reference_ms_per_step": 1e3 * t_reference / n_steps,
                     "reference_samples_per_s": batch / t_reference, "speedup": t_reference / t_runtime,
                     "sampler_overhead": (t_total - t_graphs) / t_graphs})
    for runner in runners.values():
        runner.deactivate()
    return rows


def format_table(rows: list[dict]) -> str:
    """A markdown table of bench_bundle rows."""
    lines = ["| variant | backend | precision | batch | runtime ms/step | runtime samples/s | "
             "torch eager ms/step | torch eager samples/s | speedup | sampler overhead |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['backend']}-{r['device']} | {r['precision']} | {r['batch']} | "
                     f"{r['runtime_ms_per_step']:.3f} | {r['runtime_samples_per_s']:.1f} | "
                     f"{r['reference_ms_per_step']:.3f} | {r['reference_samples_per_s']:.1f} | "
                     f"{r['speedup']:.2f}x | {100 * r['sampler_overhead']:.1f}% |")
    return "\n".join(lines)


@click.command("bench")
@click.option("--bundle", "bundle_dir", required=True, help="bundle directory")
@click.option("--backend", default="ort", show_default=True, help="torch, ort, ort-trt or trt")
@click.option("--precision", default="fp32", show_default=True, help="fp32 or fp16")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N")
@click.option("--batch", "batch_text", default="1,32", show_default=True, help="batch sizes, comma-separated")
@click.option("--steps", type=Int(1, MAX_STEPS), default=16, show_default=True, help="token steps T_x")
@click.option("--latent-steps", type=Int(1, MAX_STEPS), default=None, help="seq: latent steps T_y [default: --steps]")
@click.option("--repeat", type=Int(1, MAX_REPEAT), default=5, show_default=True,
              help="timed calls per measurement (median)")
@click.option("--threads", type=Int(1, MAX_THREADS), default=None, help="CPU threads for torch and onnxruntime")
@click.option("--ckpt", default=None, help="the bundle's model.pt, when not at the recorded path")
@click.option("--cuda-graph/--no-cuda-graph", default=None, help="torch/trt on CUDA: replay CUDA graphs")
@click.option("--compile", "compile_", is_flag=True,
              help="torch.compile the sampler's token step (and the torch backend's modules)")
@click.option("--json", "json_path", default=None, help="also write the rows as JSON to this file")
def command(bundle_dir, backend, precision, device, batch_text, steps, latent_steps, repeat, threads, ckpt,
            cuda_graph, compile_, json_path):
    """Time the sampling loop per step: the runtime vs the torch eager reference sampler."""
    from runtimes.backends import check_choice
    from runtimes.bundle import Bundle

    batches = parse_int_list("--batch", batch_text, 1, MAX_BATCH, "positive integers separated by commas, e.g. 1,32")
    if json_path:
        check_target(json_path, "--json")
    if ckpt is not None:
        check_input_file(ckpt, "--ckpt", "pass the bundle's model.pt")
    check_choice(backend, precision, device)
    bundle = Bundle.open(bundle_dir)
    rows = bench_bundle(bundle, backend, precision, device, batches, steps, latent_steps, repeat, threads, ckpt,
                        cuda_graph, compile_)
    click.echo(format_table(rows))
    if json_path:
        write_json(json_path, rows, "--json")
