"""What the sparse sampler's CPU draw costs: warm, and as the sampling loop leaves the caches.

    python benchmarks/draw_cost.py --threads 1      # results/draw_cost.json; ~1 min

The draw (runtimes.samplers.bridge_tokens: the contract's float64 cast, exp, scale, mask column,
cumsum and search, ~10 torch calls) on N rows of V, timed three ways: back to back (warm);
right after a pass over --evict-mb of memory (data caches cold); right after one call of the
text-mdlm example's trunk graph on ONNX Runtime at B = 1 (what precedes it in the sampling loop:
the graph's code and weights pass through the caches). The trunk call's own time is recorded
for scale: on the text rows, the draw's share of a B = 1 step is about its time over the trunk's.
Also timed: what a fresh [N, V] float32 output (as the ORT runner allocates one per call) costs to
write the first time, against writing it again, and to free.
Cells: the rows one sparse step draws, about B x L / T: the text examples (V = 1025) at B = 1,
T = 64, 16, 4 and at B = 32, T = 16; the edge-shaped model (V = 32768) at B = 1, T = 4 and at
B = 32, T = 16 and 4 (benchmarks/sparse_head.py).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bundles import benchmark_bundle  # noqa: E402
from runtimes.backends import make_runners  # noqa: E402
from runtimes.fileio import write_json  # noqa: E402
from runtimes.options import MAX_THREADS, OptionError, check_int  # noqa: E402
from runtimes.samplers import bridge_tokens, draw_block_rows  # noqa: E402

CELLS = [(2, 1025), (8, 1025), (32, 1025), (256, 1025), (32, 32768), (256, 32768), (1024, 32768)]


def median_seconds(fn, before, repeat: int) -> float:
    """Median seconds of fn() over `repeat` calls, each right after before() (untimed)."""
    fn()
    times = []
    for _ in range(repeat):
        before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fresh_output_ms(rows: int, vocab: int, repeat: int = 5) -> dict:
    """Milliseconds to write a freshly allocated [rows, vocab] float32 tensor (page faults and
    all), to write it again (warm), and to free it: medians of `repeat`."""
    first, again, free = [], [], []
    for _ in range(repeat):
        out = torch.empty(rows, vocab)
        start = time.perf_counter()
        out.fill_(1.0)
        first.append(time.perf_counter() - start)
        start = time.perf_counter()
        out.fill_(2.0)
        again.append(time.perf_counter() - start)
        start = time.perf_counter()
        del out
        free.append(time.perf_counter() - start)
    return {f"{name}_ms": 1e3 * statistics.median(t) for name, t in
            (("first_write", first), ("second_write", again), ("free", free))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--evict-mb", type=int, default=16)
    p.add_argument("--repeat", type=int, default=50)
    p.add_argument("--bundles", default=str(ROOT / "runs" / "sparse_head_bundles"))
    p.add_argument("--results", default=str(ROOT / "results"))
    args = p.parse_args()
    try:
        for name, value, high in (("--threads", args.threads, MAX_THREADS), ("--evict-mb", args.evict_mb, 1 << 14),
                                  ("--repeat", args.repeat, 10_000)):
            check_int(name, value, 1, high)
    except OptionError as e:
        raise SystemExit(f"draw_cost: {e}")
    torch.set_num_threads(args.threads)
    bundle = benchmark_bundle(ROOT / "examples" / "text-mdlm.pt", Path(args.bundles), batch_max=32)
    trunk = make_runners(bundle, "ort", "fp32", "cpu", graphs=["trunk"], threads=args.threads)["trunk"].activate()
    feed = {"x_t": torch.full((1, bundle.shapes["L"]), bundle.shapes["mask_id"]), "t": torch.full((1,), 0.5)}
    evict = torch.zeros(args.evict_mb << 18)  # float32: 4 bytes each
    before = {"warm": lambda: None, "evicted": lambda: evict.add_(1.0), "after_trunk": lambda: trunk.infer(feed)}
    trunk_s = median_seconds(lambda: trunk.infer(feed), lambda: None, args.repeat)
    print(f"text-mdlm trunk at B = 1: {1e3 * trunk_s:.3f} ms", flush=True)
    rows = []
    for n, vocab in CELLS:
        g = torch.Generator().manual_seed(0)
        log_probs = torch.log_softmax(torch.randn(n, vocab, generator=g), -1)
        u = torch.rand(n, generator=g, dtype=torch.float64)
        block = draw_block_rows(log_probs)
        draw = lambda: bridge_tokens(log_probs, u, 0.25, 0.5, vocab - 1, True, block)  # noqa: E731
        row = {"rows": n, "V": vocab}
        for name, fn in before.items():
            row[f"{name}_ms"] = 1e3 * median_seconds(draw, fn, args.repeat if n * vocab < 1 << 22 else 5)
        share = ""
        if vocab == bundle.shapes["V"]:  # the text model's own rows: the draw against its trunk call
            row["after_trunk_share_of_trunk"] = row["after_trunk_ms"] / (1e3 * trunk_s)
            share = f" ({100 * row['after_trunk_share_of_trunk']:.1f}% of the trunk's time)"
        if vocab > bundle.shapes["V"]:
            row["fresh_output"] = fresh_output_ms(n, vocab)
        rows.append(row)
        print(f"N = {n:5d}, V = {vocab:6d}: warm {row['warm_ms']:8.3f} ms, evicted {row['evicted_ms']:8.3f} ms, "
              f"after the trunk {row['after_trunk_ms']:8.3f} ms{share}", flush=True)
        if "fresh_output" in row:
            print(f"  a fresh [{n}, {vocab}] float32 output: " + ", ".join(
                f"{name} {ms:.2f}" for name, ms in row["fresh_output"].items()), flush=True)
    trunk.deactivate()
    Path(args.results).mkdir(parents=True, exist_ok=True)
    write_json(Path(args.results) / "draw_cost.json",
               {"command": " ".join(["python", "benchmarks/draw_cost.py", *sys.argv[1:]]), "threads": args.threads,
                "evict_mb": args.evict_mb, "repeat": args.repeat, "trunk_ms": 1e3 * trunk_s, "rows": rows},
               "the draw costs")


if __name__ == "__main__":
    main()
