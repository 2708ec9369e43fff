"""Benchmark the sampling loop of a bundle: the runtime vs the torch eager reference sampler.

Called by `lddm-export bench` and benchmarks/runtime_bench.py.

For each batch size B, one sampling call of T_x token steps (plus T_y latent steps for seq)
is timed on the runtime (the backend's runners inside runtimes.samplers) and on the reference
sampler of training/sampling.py with the checkpoint's eager torch modules, both fed the same
noise. Each side gets one warm-up call, then the two are called alternately `repeat` times
(so both see the same machine load) and the medians are reported:
    ms/step   = call time / (T_x + T_y)
    samples/s = B / call time
    sampler overhead = (call time - time inside the graphs) / time inside the graphs, the median
                       of OVERHEAD_CALLS more runtime calls with every infer() timed (and
                       synchronised on a GPU)
The torch threads and the onnxruntime intra-op threads are both set to `threads`, so the
comparison is fair on a shared CPU.
"""
from __future__ import annotations

import statistics
import time

import torch

from runtimes.backends import make_runners
from runtimes.backends.torch_runner import checkpoint_path
from runtimes.errors import LddmError
from runtimes.noise import draw_noise, latent_shape
from runtimes.options import check_job, steps_per_call
from runtimes.progress import progress
from runtimes.samplers import Sampler, sampler_graphs
from runtimes.schedules import latent_steps_for
from training import sampling
from training.checkpoint import load_checkpoint, load_reference_graphs

# Instrumented calls per sampler-overhead figure: one call's share of time outside the graphs
# varies by a few points on a shared machine, so the median of several is reported.
OVERHEAD_CALLS = 3


def paired_median_seconds(fn_a, fn_b, repeat: int, after_call=lambda: None) -> tuple[float, float]:
    """Median wall times (seconds) of fn_a() and fn_b() over `repeat` alternating calls each.

    One warm-up call of each first. Alternating the two puts both under the same load, which
    matters on a shared machine. after_call() runs after every call, outside the timing.
    """
    for fn in (fn_a, fn_b):
        fn()
        after_call()
    times_a, times_b = [], []
    for _ in range(repeat):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
            after_call()
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


def reference_sampler(bundle, ckpt, device: str, latent_steps: int | None):
    """training/sampling.py's loop on the checkpoint's eager modules, as a function of the noise."""
    model = load_checkpoint(checkpoint_path(bundle, ckpt))[0].to(device)
    return lambda noise: sampling.sample_call(model, noise, latent_steps)


def sampler_overhead(bundle, runners: dict, noise, latent_steps: int | None, sync, calls: int = OVERHEAD_CALLS,
                     after_call=lambda: None, **options) -> float:
    """(call time - time inside the graphs) / time inside the graphs: the median over `calls`
    instrumented calls of one sampler with `options` (Sampler's), built before the clock starts.
    after_call() runs after every call, outside the timing."""
    timed = {name: TimedRunner(runner, sync) for name, runner in runners.items()}
    sampler = Sampler.from_bundle(bundle, timed, **options)
    ratios = []
    for _ in range(calls):
        for runner in timed.values():
            runner.seconds = 0.0
        start = time.perf_counter()
        sampler.sample(noise, latent_steps)
        sync()
        t_total, t_graphs = time.perf_counter() - start, sum(r.seconds for r in timed.values())
        ratios.append((t_total - t_graphs) / t_graphs)
        after_call()
    return statistics.median(ratios)


def bench_bundle(bundle, backend: str, precision: str, device: str, batches: list[int], steps: int,
                 latent_steps: int | None, repeat: int, threads: int | None, ckpt=None,
                 cuda_graph: bool | None = None, compile: bool = False, show_progress: bool = True,
                 head: str = "sparse") -> list[dict]:
    """Time the runtime and the reference sampler on one bundle.

    Args:
        bundle: an opened runtimes.bundle.Bundle.
        backend, precision, device: the runtime under test (as for make_runners).
        batches: batch sizes B; steps: T_x; latent_steps: T_y (seq; None defaults to steps).
        repeat: timed calls per measurement (median reported); threads: CPU threads, or None.
        ckpt: an explicit checkpoint for the reference, or None for the manifest's.
        cuda_graph: the runners' CUDA-graph option (as for make_runners).
        compile: torch.compile the sampler's token step, and the modules of the torch backend.
        head: the runtime sampler's head, "sparse" or "dense" (runtimes.samplers.Sampler).
        show_progress: show the progress of the timed calls (runtimes.progress) until the rows are done.
    Returns:
        one row per batch: {"variant", "backend", "precision", "device", "batch", "steps",
        "head", "runtime_ms_per_step", "runtime_samples_per_s", "reference_ms_per_step",
        "reference_samples_per_s", "speedup", "sampler_overhead"}; sampler_overhead is the
        time outside the graphs over the time inside them (sampler_overhead).
    """
    if threads is not None:
        torch.set_num_threads(threads)
    variant, shapes = bundle.variant, bundle.shapes
    latent_steps = latent_steps_for(variant, steps, latent_steps)
    n_steps = steps_per_call(steps, latent_steps)
    max_batch = bundle.manifest["batch_profile"]["max"]
    if max(batches) > max_batch:
        raise LddmError(f"--batch {max(batches)} is above the bundle's batch profile maximum {max_batch}; "
                        f"bench batches <= {max_batch} or rebuild with a larger --batch")
    check_job(max(batches), max(batches), steps, latent_steps, shapes)
    runners = make_runners(bundle, backend, precision, device, ckpt=ckpt, graphs=list(sampler_graphs(variant, head)),
                           threads=threads, cuda_graph=cuda_graph, compile=compile and backend == "torch",
                           reference=load_reference_graphs)
    for runner in runners.values():
        runner.activate()
    sampler = Sampler.from_bundle(bundle, runners, head=head, compile=compile)
    reference = reference_sampler(bundle, ckpt, device, latent_steps)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    calls_per_batch = 2 * (1 + repeat) + OVERHEAD_CALLS  # warm-ups, timed pairs, the instrumented calls
    rows = []
    with progress(len(batches) * calls_per_batch, f"bench {variant} ({backend} {precision})", unit="call",
                  enabled=show_progress) as bar:
        for batch in batches:
            noise = draw_noise(0, batch, steps, shapes["L"], latent_shape(variant, shapes))

            def run_runtime():
                sampler.sample(noise, latent_steps)
                sync()

            def run_reference():
                reference(noise)
                sync()

            t_runtime, t_reference = paired_median_seconds(run_runtime, run_reference, repeat,
                                                           after_call=lambda: bar.update(1))
            overhead = sampler_overhead(bundle, runners, noise, latent_steps, sync, after_call=lambda: bar.update(1),
                                        head=head, compile=compile)
            rows.append({"variant": variant, "backend": backend, "precision": precision, "device": device, "head": head,
                         "batch": batch, "steps": n_steps,
                         "runtime_ms_per_step": 1e3 * t_runtime / n_steps, "runtime_samples_per_s": batch / t_runtime,
                         "reference_ms_per_step": 1e3 * t_reference / n_steps,
                         "reference_samples_per_s": batch / t_reference, "speedup": t_reference / t_runtime,
                         "sampler_overhead": overhead})
    for runner in runners.values():
        runner.deactivate()
    return rows


def format_table(rows: list[dict]) -> str:
    """A markdown table of bench_bundle rows."""
    lines = ["| variant | backend | precision | head | batch | runtime ms/step | runtime samples/s | "
             "torch eager ms/step | torch eager samples/s | speedup | sampler overhead |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['backend']}-{r['device']} | {r['precision']} | {r['head']} | {r['batch']} | "
                     f"{r['runtime_ms_per_step']:.3f} | {r['runtime_samples_per_s']:.1f} | "
                     f"{r['reference_ms_per_step']:.3f} | {r['reference_samples_per_s']:.1f} | "
                     f"{r['speedup']:.2f}x | {100 * r['sampler_overhead']:.1f}% |")
    return "\n".join(lines)
