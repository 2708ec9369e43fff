"""Serving throughput: samples/s of `lddm-export serve` at 1, 8 and 32 concurrent clients, vs one
`lddm-export sample` process drawing the same number of samples.

Each client sends requests one after another (HTTP, tritonclient), each for --num samples at
--steps token steps from its own seed, until --duration seconds have passed; samples/s is every
served sample over the wall time of the round. The server's dynamic batcher merges the requests
in flight into one sampler call (runtimes/serving.py), so with more clients the sampler runs at
larger batches. The reference is one `lddm-export sample --num K --batch-size B` process, its
wall time with start-up, for K = --process-samples and B the bundle's batch maximum.

    python benchmarks/serving.py --threads 1        # results/serving.json, results/serving.png
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bundles import benchmark_bundle  # noqa: E402
from serve_client import request_inputs, response_fields  # noqa: E402


BATCHES: list[int] = []   # the size of every dynamic batch the server logged, in order


def start_server(bundle: Path, port: int, args) -> subprocess.Popen:
    server = subprocess.Popen(
        [sys.executable, "-m", "lddm_export.cli", "serve", "--bundle", str(bundle), "--port", str(port),
         "--threads", str(args.threads), "--queue-delay-ms", str(args.queue_delay_ms), "--max-requests", "64"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env={**os.environ, "TMPDIR": "/tmp"})
    for line in server.stderr:
        if line.startswith("serving"):
            break
    else:
        raise SystemExit("the server did not start")
    def read_log() -> None:
        for line in server.stderr:
            if line.startswith("served a batch of "):
                BATCHES.append(int(line.split()[4]))

    threading.Thread(target=read_log, daemon=True).start()
    return server


def round_of(port: int, clients: int, args) -> dict:
    """`clients` threads sending requests back to back for args.duration seconds."""
    import tritonclient.http as http

    served, latencies, lock = [0], [], threading.Lock()
    deadline = time.perf_counter() + args.duration

    def client(index: int) -> None:
        with http.InferenceServerClient(f"127.0.0.1:{port}") as connection:
            seed = 1000 * index
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                answer = response_fields(connection.infer("lddm", request_inputs(http, seed, args.num, args.steps)))
                if answer["error"]:
                    raise SystemExit(answer["error"])
                with lock:
                    served[0] += len(answer["tokens"])
                    latencies.append(time.perf_counter() - start)
                seed += 1

    start, first_batch = time.perf_counter(), len(BATCHES)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    latencies.sort()
    time.sleep(0.5)   # the server's log of the last batch
    batches = BATCHES[first_batch:]
    row = {"clients": clients, "samples": served[0], "wall_s": wall, "samples_per_s": served[0] / wall,
           "request_latency_median_s": latencies[len(latencies) // 2],
           "requests_per_batch_mean": sum(batches) / len(batches), "requests_per_batch_max": max(batches)}
    print(json.dumps(row), flush=True)
    return row


def sample_process(bundle: Path, num: int, batch: int, args) -> dict:
    """One `lddm-export sample` process: its wall time, start-up included."""
    out = Path(tempfile.mkdtemp()) / "samples.npy"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lddm_export.cli", "sample", "--bundle", str(bundle), "--steps",
                    str(args.steps), "--num", str(num), "--batch-size", str(batch), "--threads", str(args.threads),
                    "--seed", "0", "--out", str(out)], check=True, capture_output=True)
    wall = time.perf_counter() - start
    out.unlink()
    row = {"samples": num, "batch_size": batch, "wall_s": wall, "samples_per_s": num / wall}
    print(json.dumps({"sample_process": row}), flush=True)
    return row


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = result["rounds"]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.plot([r["clients"] for r in rounds], [r["samples_per_s"] for r in rounds], marker="o",
            label=f"lddm-export serve ({result['num']} sample per request)")
    ax.axhline(result["sample_process"]["samples_per_s"], color="gray", ls="--",
               label=f"one lddm-export sample process (batch {result['sample_process']['batch_size']})")
    ax.set_xscale("log", base=2)
    ax.set_xticks([r["clients"] for r in rounds], [str(r["clients"]) for r in rounds])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("samples / s")
    ax.set_title(f"{result['bundle']}, T = {result['steps']}, ORT-CPU, {result['threads']} thread(s)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=str(ROOT / "examples" / "text-fuji.pt"))
    p.add_argument("--bundles", default=str(ROOT / "runs" / "serving_bundles"))
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--num", type=int, default=1, help="samples per request")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per round")
    p.add_argument("--threads", type=int, default=1, help="ORT intra-op threads, server and sample alike")
    p.add_argument("--queue-delay-ms", type=int, default=5)
    p.add_argument("--process-samples", type=int, default=512, help="samples of the lddm-export sample run")
    p.add_argument("--port", type=int, default=18500)
    p.add_argument("--results", default=str(ROOT / "results"))
    args = p.parse_args()
    bundle = benchmark_bundle(Path(args.ckpt), Path(args.bundles))
    server = start_server(bundle.root, args.port, args)
    try:
        rounds = [round_of(args.port, int(c), args) for c in args.clients.split(",")]
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
    result = {"command": " ".join(["python", "benchmarks/serving.py", *sys.argv[1:]]), "bundle": bundle.root.name,
              "steps": args.steps, "num": args.num, "threads": args.threads, "duration_s": args.duration,
              "queue_delay_ms": args.queue_delay_ms, "rounds": rounds,
              "sample_process": sample_process(bundle.root, args.process_samples, bundle.manifest["batch_profile"]["max"],
                                              args)}
    results = Path(args.results)
    (results / "serving.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, results / "serving.png")


if __name__ == "__main__":
    main()
