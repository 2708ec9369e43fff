"""`lddm-export build`: checkpoint -> bundle, or TensorRT engines for an existing bundle.

    lddm-export build --ckpt model.pt [--out DIR] [--precision fp32,fp16] [--engines auto|on|off]
                      [--batch MIN,OPT,MAX] [--opset N] [--force] [--workspace-mb N]
    lddm-export build --bundle DIR --engines on [--precision fp16] [--batch ...] [--workspace-mb N]

The second form runs on the target device (a Jetson) and imports only tensorrt, onnx and
numpy. The pipeline lives in lddm_export.build.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from lddm_export.build import (DEFAULT_BATCH, DEFAULT_OPSET, DEFAULT_PRECISIONS, ENGINE_MODES, MAX_WORKSPACE_MB,
                               build_bundle, build_engines_for_bundle, bundle_precisions, parse_options)
from lddm_export.commands.numbers import Int
from lddm_export.manifest import read_manifest
from runtimes.errors import LddmError
from runtimes.fileio import check_input_file


@click.command(help="Export a checkpoint to a bundle (ONNX FP32 + mixed FP16, TensorRT engines, manifest), "
                    "or add TensorRT engines to an existing bundle with --bundle DIR --engines on.")
@click.option("--ckpt", type=click.Path(path_type=Path), help="the checkpoint (model.pt) to export")
@click.option("--bundle", type=click.Path(path_type=Path),
              help="an existing bundle to add TensorRT engines to (with --engines on)")
@click.option("--out", type=click.Path(path_type=Path), help="bundle directory [default: bundles/<ckpt stem>]")
@click.option("--precision", default=None,
              help="ONNX graphs (and engines) to build, among fp32, fp16, int8 [default: fp32,fp16; with --bundle, "
                   "what it has]")
@click.option("--engines", type=click.Choice(ENGINE_MODES), default="auto", show_default=True,
              help="TensorRT engines: auto builds them where tensorrt and a GPU are present")
@click.option("--batch", default=None,
              help="TensorRT batch profile MIN,OPT,MAX, 1 <= MIN <= OPT <= MAX <= 65536 "
                   "[default: 1,8,64; with --bundle, the bundle's]")
@click.option("--opset", type=Int(1, 1000), default=DEFAULT_OPSET, show_default=True,
              help="ONNX opset (>= 17, and known to the installed onnx)")
@click.option("--force", is_flag=True, help="replace an existing --out and rebuild every stage")
@click.option("--workspace-mb", type=Int(1, MAX_WORKSPACE_MB), default=None,
              help="cap on TensorRT's builder workspace (MiB)")
@click.option("--calibrate/--no-calibrate", default=True, show_default=True,
              help="choose extra FP32 islands of the FP16 graphs from sampling-trajectory statistics "
                   "(int8 needs it)")
@click.option("--max-model-gib", type=float, default=None,
              help="refuse a checkpoint whose model (float32 weights) is larger [default: 4]")
def command(ckpt, bundle, out, precision, engines, batch, opset, force, workspace_mb, calibrate, max_model_gib):
    options = parse_options(precision or ",".join(DEFAULT_PRECISIONS), engines, batch or DEFAULT_BATCH, opset,
                            workspace_mb, force, calibrate, max_model_gib)
    if (ckpt is None) == (bundle is None):
        raise LddmError("pass exactly one of --ckpt model.pt (export a bundle) or --bundle DIR "
                        "(add TensorRT engines to an existing bundle)")
    if bundle is not None:
        if out is not None or engines == "off":
            raise LddmError("--bundle DIR only adds TensorRT engines to DIR in place; "
                            "pass --engines on and no --out")
        manifest = read_manifest(bundle)
        if precision is None:
            options = dataclasses.replace(options, precisions=bundle_precisions(manifest))
        if batch is None:
            options = dataclasses.replace(options, profile=dict(manifest["batch_profile"]))
        build_engines_for_bundle(bundle, options, log=click.echo)
    else:
        check_input_file(ckpt, "--ckpt", "pass the model.pt written by lddm-train")
        build_bundle(ckpt, out, options, log=click.echo)
