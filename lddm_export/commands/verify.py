"""`lddm-export verify`: the parity gate (lddm_export/verify.py has the three levels)."""
from __future__ import annotations

import click

from lddm_export.build import parse_precisions
from lddm_export.commands.numbers import Int
from runtimes.fileio import check_input_file, check_target
from runtimes.options import MAX_SAMPLES, MAX_SEED, MAX_STEPS, check_job
from runtimes.spec import HEADS


@click.command("verify")
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(path_type=str), help="bundle directory")
@click.option("--ckpt", required=True, type=click.Path(path_type=str), help="the checkpoint the bundle was built from")
@click.option("--backend", type=click.Choice(["ort", "ort-trt", "trt"]), default="ort", show_default=True)
@click.option("--precision", "precisions", default="fp32,fp16", show_default=True,
              callback=lambda ctx, param, value: parse_precisions(value))
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda")
@click.option("--steps", type=Int(1, MAX_STEPS), default=8, show_default=True, help="token steps (levels 2, 3)")
@click.option("--latent-steps", type=Int(1, MAX_STEPS), default=None, help="seq latent steps [default: --steps]")
@click.option("--samples", type=Int(16, MAX_SAMPLES), default=1024, show_default=True,
              help="samples per precision for the distribution check")
@click.option("--seed", type=Int(0, MAX_SEED), default=0, show_default=True)
@click.option("--evaluator", type=click.Path(path_type=str), default=None,
              help="text bundles: an AR checkpoint (lddm-train --variant ar) with the bundle's tokenizer, "
                   "which scores samples by generative perplexity")
@click.option("--head", type=click.Choice(HEADS), default="sparse", show_default=True,
              help="the token head of the sampler under test (levels 2, 3); the torch reference is dense")
@click.option("--json", "json_path", type=click.Path(path_type=str), default=None, help="also write the report here")
def command(bundle_dir, ckpt, backend, precisions, device, steps, latent_steps, samples, seed, evaluator, head,
            json_path):
    """Check a bundle against its checkpoint: per graph, per trajectory, per distribution.

    Prints every measured value beside its threshold, writes parity.json into the bundle and
    exits 1 when any tolerance fails. The sampling's progress goes to stderr.
    """
    from lddm_export.manifest import read_manifest
    from lddm_export.verify import VerifyOptions, verify_bundle
    from runtimes.schedules import latent_steps_for

    check_input_file(ckpt, "--ckpt", "pass the model.pt the bundle was built from")
    if evaluator is not None:
        check_input_file(evaluator, "--evaluator", "pass an AR checkpoint written by lddm-train --variant ar")
    if json_path:
        check_target(json_path, "--json")
    options = VerifyOptions(backend=backend, precisions=precisions, device=device, seed=seed, steps=steps,
                            latent_steps=latent_steps, distribution_samples=samples, evaluator=evaluator, head=head)
    manifest = read_manifest(bundle_dir)
    check_job(samples, options.batch_size, steps, latent_steps_for(manifest["variant"], steps, latent_steps),
              manifest["shapes"])
    report = verify_bundle(bundle_dir, ckpt, options, json_path, log=click.echo)
    click.echo(f"[verify] {report['bundle']}: all parity checks passed (parity.json written)")
