"""`lddm-export serve`: serve a bundle's sampler on Triton Inference Server (PyTriton), HTTP and gRPC.

    lddm-export serve --bundle DIR [--backend ort|trt|torch] [--precision fp32] [--port 8000]

HTTP listens on --port, gRPC on --port + 1 (Triton's 8000 and 8001), on --host (loopback by
default). Requests (runtimes.serving): seed, num, steps, optional latent_steps, prompt or
template; responses: tokens [num, L], text [num] and error. Concurrent requests with the same
step counts are batched into one sampler call; a request's samples equal `lddm-export sample`'s
with the same seed. examples/serve_client.py is a client. Ctrl-C or SIGTERM stops the server.
"""
from __future__ import annotations

from pathlib import Path

import click

from lddm_export.commands.numbers import Int
from runtimes.fileio import check_input_file
from runtimes.options import MAX_BATCH, MAX_LATENT_CANDIDATES, MAX_SAMPLES, MAX_STEPS, MAX_THREADS

MAX_PORT = 65535 - 1          # gRPC takes the next port
MAX_QUEUE_DELAY_MS = 10_000


def serving_options(command):
    """The options `serve` and `triton-repo` share: what one request may ask, and the batcher."""
    options = [
        click.option("--max-samples", type=Int(1, MAX_SAMPLES), default=256, show_default=True,
                     help="the most samples one request may ask for"),
        click.option("--max-steps", type=Int(1, MAX_STEPS), default=1024, show_default=True,
                     help="the most token (or latent) steps one request may ask for"),
        click.option("--max-latent-candidates", type=Int(1, MAX_LATENT_CANDIDATES), default=16, show_default=True,
                     help="the most SEQ latent candidates one prompted request may ask for"),
        click.option("--max-requests", type=Int(1, MAX_BATCH), default=64, show_default=True,
                     help="requests per dynamic batch"),
        click.option("--queue-delay-ms", type=Int(0, MAX_QUEUE_DELAY_MS), default=5, show_default=True,
                     help="how long the dynamic batcher waits for more requests"),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.command("serve")
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(path_type=Path), help="bundle directory")
@click.option("--backend", default="ort", show_default=True, help="torch, ort, ort-trt or trt")
@click.option("--precision", default="fp32", show_default=True, help="fp32, fp16 or int8")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on (0.0.0.0: every interface)")
@click.option("--port", type=Int(1024, MAX_PORT), default=8000, show_default=True,
              help="HTTP port; gRPC uses port + 1")
@click.option("--model-name", default="lddm", show_default=True, help="the model's name on the server")
@serving_options
@click.option("--ckpt", type=click.Path(path_type=Path), default=None,
              help="torch backend: the bundle's model.pt, when not at the path the manifest records")
@click.option("--threads", type=Int(1, MAX_THREADS), default=None, help="ort on the CPU: intra-op threads per graph")
def command(bundle_dir, backend, precision, device, host, port, model_name, max_samples, max_steps,
            max_latent_candidates, max_requests, queue_delay_ms, ckpt, threads):
    """Serve samples from a bundle over HTTP and gRPC (Triton Inference Server via PyTriton)."""
    from lddm_export.serve import ServeError, check_model_name, python_library_dir, serve
    from runtimes.backends import check_choice, make_runners
    from runtimes.bundle import Bundle
    from runtimes.samplers import Sampler, sampler_graphs
    from runtimes.serving import Limits, RequestHandler
    from training.checkpoint import load_reference_graphs

    check_model_name(model_name)
    if ckpt is not None:
        check_input_file(ckpt, "--ckpt", "pass the bundle's model.pt")
    check_choice(backend, precision, device)
    python_library_dir()
    try:
        import pytriton  # noqa: F401
    except ImportError:
        raise ServeError("serving needs PyTriton, which is not installed; pip install 'lddm-export[serve]'") from None
    bundle = Bundle.open(bundle_dir)
    max_batch = bundle.manifest["batch_profile"]["max"]
    runners = make_runners(bundle, backend, precision, device, ckpt=ckpt,
                           graphs=list(sampler_graphs(bundle.variant, "sparse")), threads=threads,
                           reference=load_reference_graphs)
    for runner in runners.values():
        runner.activate()
    limits = Limits(max_samples, max_steps, max_latent_candidates)
    handler = RequestHandler(Sampler.from_bundle(bundle, runners), bundle.manifest, limits, max_batch)

    def ready() -> None:
        click.echo(f"serving {bundle_dir} ({bundle.variant}, {backend} {precision}) as model {model_name!r}: "
                   f"HTTP {host}:{port}, gRPC {host}:{port + 1}; Ctrl-C stops", err=True)

    try:
        serve(handler, model_name, bundle.shapes["L"], host, port, max_requests, 1000 * queue_delay_ms, ready,
              log=lambda line: click.echo(line, err=True))
    except KeyboardInterrupt:   # PyTriton returns on the first signal; a second one lands here
        pass
    finally:
        for runner in runners.values():
            runner.deactivate()
    click.echo("server stopped", err=True)
