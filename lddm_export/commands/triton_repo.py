"""`lddm-export triton-repo`: a Triton Inference Server model repository from a bundle.

    lddm-export triton-repo --bundle DIR --out REPO [--precision fp16] [--graph-backend auto]
    tritonserver --model-repository REPO        # on the server; lddm-export installed there

The repository (lddm_export/triton_repo.py): a Python (BLS) model that runs the sampling loop,
speaking `lddm-export serve`'s protocol, and one model per graph it calls (TensorRT plans,
ONNX Runtime, or ONNX Runtime inside the Python backend).
"""
from __future__ import annotations

from pathlib import Path

import click

from lddm_export.commands.numbers import Int
from lddm_export.commands.serve import serving_options
from lddm_export.triton_repo import GRAPH_BACKENDS, KINDS, write_repo
from runtimes.serving import Limits

MAX_INSTANCES = 64


@click.command("triton-repo")
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(path_type=Path), help="bundle directory")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="the model repository to write")
@click.option("--precision", default="fp32", show_default=True, help="fp32, fp16 or int8: which graphs to serve")
@click.option("--graph-backend", type=click.Choice(GRAPH_BACKENDS), default="auto", show_default=True,
              help="auto: tensorrt where the bundle has engines of every graph, else onnxruntime")
@click.option("--kind", type=click.Choice(KINDS), default="gpu", show_default=True,
              help="where the instances run (the python graph backend always runs on the CPU)")
@click.option("--instances", type=Int(1, MAX_INSTANCES), default=1, show_default=True,
              help="instances of the sampler model")
@click.option("--model-name", default="lddm", show_default=True, help="the sampler model's name")
@serving_options
@click.option("--force", is_flag=True, help="replace an existing --out")
def command(bundle_dir, out, precision, graph_backend, kind, instances, model_name, max_samples, max_steps,
            max_latent_candidates, max_requests, queue_delay_ms, force):
    """Write a Triton model repository: the sampling loop as a BLS model, the graphs as models."""
    from lddm_export.serve import check_model_name
    from runtimes.backends import check_choice

    check_choice("ort", precision, "cpu")
    check_model_name(model_name)
    limits = Limits(max_samples, max_steps, max_latent_candidates)
    write_repo(bundle_dir, out, model_name, precision, graph_backend, kind, limits, max_requests, 1000 * queue_delay_ms,
               instances, force, log=click.echo)
