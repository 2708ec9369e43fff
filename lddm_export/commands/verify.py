"""`lddm-export verify`: the parity gate (lddm_export/verify.py has the three levels)."""
from __future__ import annotations

import click

from runtimes.bundle import PRECISIONS


def _precisions(ctx, param, value: str) -> tuple[str, ...]:
    chosen = tuple(p.strip() for p in value.split(",") if p.strip())
    unknown = [p for p in chosen if p not in PRECISIONS]
    if not chosen or unknown:
        raise click.BadParameter(f"{value!r} must be a comma-separated subset of {','.join(PRECISIONS)}")
    return chosen


@click.command("verify")
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(path_type=str), help="bundle directory")
@click.option("--ckpt", required=True, type=click.Path(path_type=str), help="the checkpoint the bundle was built from")
@click.option("--backend", type=click.Choice(["ort", "ort-trt", "trt"]), default="ort", show_default=True)
@click.option("--precision", "precisions", default="fp32,fp16", show_default=True, callback=_precisions)
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda")
@click.option("--steps", type=click.IntRange(min=1), default=8, show_default=True, help="token steps (levels 2, 3)")
@click.option("--latent-steps", type=click.IntRange(min=1), default=None, help="seq latent steps [default: --steps]")
@click.option("--samples", type=click.IntRange(min=16), default=1024, show_default=True,
              help="samples per precision for the distribution check")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--evaluator", type=click.Path(path_type=str), default=None,
              help="text bundles: an AR checkpoint (lddm-train --variant ar) with the bundle's tokenizer, "
                   "which scores samples by generative perplexity")
@click.option("--json", "json_path", type=click.Path(path_type=str), default=None, help="also write the report here")
def command(bundle_dir, ckpt, backend, precisions, device, steps, latent_steps, samples, seed, evaluator, json_path):
    """Check a bundle against its checkpoint: per graph, per trajectory, per distribution.

    Writes parity.json into the bundle and exits 1 when any tolerance fails.
    """
    from lddm_export.verify import VerifyOptions, verify_bundle

    options = VerifyOptions(backend=backend, precisions=precisions, device=device, seed=seed, steps=steps,
                            latent_steps=latent_steps, distribution_samples=samples, evaluator=evaluator)
    report = verify_bundle(bundle_dir, ckpt, options, json_path, log=click.echo)
    click.echo(f"[verify] {report['bundle']}: all parity checks passed (parity.json written)")
