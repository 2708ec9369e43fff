"""`lddm-export`: the command-line entry point.

Each command lives in lddm_export/commands/<name>.py and exposes a click command named
`command`; commands are imported only when invoked, so `lddm-export --help` and the
TensorRT-only paths start without importing torch or training/.

Every user-facing failure is an LddmError (or a checkpoint/config error, or a click usage
error) whose message is one sentence; main() prints it and exits 1 without a traceback.
Ctrl-C and SIGTERM are the same interrupt: whatever was being written is removed, exit 130.
"""
from __future__ import annotations

import importlib
import signal
import sys

import click

COMMANDS = {
    "build": "checkpoint -> bundle: ONNX FP32/FP16 graphs, TensorRT engines, manifest",
    "inspect": "show a bundle's manifest as tables and check its files' sha256 (exit 1 if one changed)",
    "doctor": "what this machine has (torch, onnxruntime, TensorRT, CUDA, GPU) and can do",
    "sample": "sample from a bundle with a backend (torch, ort, trt)",
    "bench": "time the sampling loop per step on a bundle",
    "verify": "three-level numerical parity of a bundle against its checkpoint",
    "serve": "serve a bundle's sampler over HTTP and gRPC (Triton Inference Server via PyTriton)",
    "triton-repo": "write a Triton model repository: the sampling loop as a BLS model, the graphs as models",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        return importlib.import_module(f"lddm_export.commands.{name.replace('-', '_')}").command

    def format_commands(self, ctx, formatter):
        with formatter.section("Commands"):
            formatter.write_dl(list(COMMANDS.items()))


@click.group(cls=LazyGroup)
@click.version_option(package_name="lddm-export")
def cli():
    """Train-to-deploy toolchain for latent discrete diffusion models."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types whose message is meant for the user.

    training/'s are looked up only if training/ was imported: the engine-only path on a Jetson
    imports neither it nor torch, and must not start to here.
    """
    from runtimes.errors import LddmError

    errors: list[type[BaseException]] = [LddmError]
    if "training.config" in sys.modules:
        errors.append(sys.modules["training.config"].ConfigError)
    if "training.checkpoint" in sys.modules:
        errors.append(sys.modules["training.checkpoint"].CheckpointError)
    return tuple(errors)


def main(argv: list[str] | None = None) -> None:
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM raises KeyboardInterrupt
    try:
        cli.main(args=argv, prog_name="lddm-export", standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("lddm-export: interrupted; nothing was left half-written", err=True)
        sys.exit(130)
    except click.UsageError as e:
        command = e.ctx.command_path if e.ctx is not None else "lddm-export"
        click.echo(f"lddm-export: error: {e.format_message()} (see `{command} --help`)", err=True)
        sys.exit(1)
    except click.ClickException as e:
        click.echo(f"lddm-export: error: {e.format_message()}", err=True)
        sys.exit(1)
    except Exception as e:
        if isinstance(e, user_errors()):
            click.echo(f"lddm-export: error: {e}", err=True)
            sys.exit(1)
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":
    main()
