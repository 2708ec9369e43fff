"""`lddm-export bench`: per-step latency and samples/s of the runtime vs the torch eager reference.

    lddm-export bench --bundle DIR --backend ort --batch 1,32 --steps 16 [--json FILE]

The measurement (what is timed, and how) is lddm_export/bench.py's; this command checks the
options, opens the bundle, shows the progress and prints the table.
"""
from __future__ import annotations

import click

from lddm_export.commands.numbers import Int
from runtimes.fileio import check_input_file, check_target, write_json
from runtimes.options import MAX_BATCH, MAX_STEPS, MAX_THREADS, parse_int_list
from runtimes.spec import HEADS

MAX_REPEAT = 1000


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
@click.option("--head", type=click.Choice(HEADS), default="sparse", show_default=True,
              help="the runtime's token head: log-probs only where tokens unmask (sparse), or everywhere")
@click.option("--json", "json_path", default=None, help="also write the rows as JSON to this file")
def command(bundle_dir, backend, precision, device, batch_text, steps, latent_steps, repeat, threads, ckpt,
            cuda_graph, compile_, head, json_path):
    """Time the sampling loop per step: the runtime vs the torch eager reference sampler."""
    from lddm_export.bench import bench_bundle, format_table
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
                        cuda_graph, compile_, head=head)
    click.echo(format_table(rows))
    if json_path:
        write_json(json_path, rows, "--json")
