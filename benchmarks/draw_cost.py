"""What the sparse sampler's CPU draw costs, warm and with cold caches (results/draw_cost.json).

    python benchmarks/draw_cost.py --threads 1

The draw (runtimes.samplers.bridge_tokens: the contract's float64 cast, exp, scale, mask column,
cumsum and search) on N rows of V, timed back to back (warm) and right after a pass over
--evict-mb of memory (the caches as a graph call leaves them: the text examples' weights are
~4 MB, the edge model's ~40 MB). Cells: the rows one sparse step draws on the models of
benchmarks/sparse_head.py (about B x L / T), and the whole step's time inside the graphs
recorded in results/sparse_head.json for scale.
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

from runtimes.fileio import write_json  # noqa: E402
from runtimes.samplers import bridge_tokens, draw_block_rows  # noqa: E402

# (rows N, V): text examples (V = 1025) at B = 1, T = 4 and 16 and at B = 32, T = 16; the edge
# model (V = 32768) at B = 1, T = 4 and at B = 32, T = 4 and 16.
CELLS = [(32, 1025), (8, 1025), (256, 1025), (32, 32768), (1024, 32768), (256, 32768)]


def draw_seconds(rows: int, vocab: int, evict: torch.Tensor | None, repeat: int) -> float:
    """Median seconds of one draw on [rows, vocab] log-probs, after touching `evict` if given."""
    g = torch.Generator().manual_seed(0)
    log_probs = torch.log_softmax(torch.randn(rows, vocab, generator=g), -1)
    u = torch.rand(rows, generator=g, dtype=torch.float64)
    block = draw_block_rows(log_probs)
    times = []
    for _ in range(repeat + 1):
        if evict is not None:
            evict.add_(1.0)
        start = time.perf_counter()
        bridge_tokens(log_probs, u, 0.25, 0.5, vocab - 1, True, block)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--evict-mb", type=int, default=16)
    p.add_argument("--repeat", type=int, default=50)
    p.add_argument("--results", default=str(ROOT / "results"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    evict = torch.zeros(args.evict_mb << 18)  # float32: 4 bytes each
    rows = []
    for n, vocab in CELLS:
        warm, cold = (draw_seconds(n, vocab, e, args.repeat) for e in (None, evict))
        rows.append({"rows": n, "V": vocab, "warm_ms": 1e3 * warm, "cold_ms": 1e3 * cold,
                     "warm_us_per_row": 1e6 * warm / n, "cold_us_per_row": 1e6 * cold / n})
        print(f"N = {n:5d}, V = {vocab:6d}: warm {1e3 * warm:8.3f} ms, after evicting {args.evict_mb} MB "
              f"{1e3 * cold:8.3f} ms ({1e6 * cold / n:.1f} us per row)", flush=True)
    Path(args.results).mkdir(parents=True, exist_ok=True)
    write_json(Path(args.results) / "draw_cost.json",
               {"command": " ".join(["python", "benchmarks/draw_cost.py", *sys.argv[1:]]), "threads": args.threads,
                "evict_mb": args.evict_mb, "repeat": args.repeat, "rows": rows}, "the draw costs")


if __name__ == "__main__":
    main()
