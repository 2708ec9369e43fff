"""The runtime sampler behind Triton Inference Server, through PyTriton (`lddm-export serve`).

PyTriton starts the tritonserver it bundles (HTTP and gRPC endpoints, dynamic batching) and
routes each dynamic batch of requests to a Python callable in this process:
runtimes.serving.RequestHandler, which samples the requests that share step counts in one
sampler call. Protocol: runtimes.serving.INPUTS / OUTPUTS.

Triton's Python-backend stub is linked against libpython of the serving interpreter's version,
and PyTriton passes this process's environment on to the server. So the stub must find this
interpreter's own libpython first on LD_LIBRARY_PATH: otherwise it loads another build of the
same version (here: Debian's 3.11.2 under pyenv's 3.11.7 standard library, which fails with
"'_thread.RLock' object has no attribute '_recursion_count'") or none at all.

Importing this module needs neither torch nor PyTriton (doctor reads python_library_dir).
"""
from __future__ import annotations

import os
import shutil
import socket
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from runtimes.errors import LddmError


# PyTriton puts Unix sockets in its workspace, ~60 characters below it; a socket path has at most 107.
MAX_TMPDIR_CHARS = 40


class ServeError(LddmError):
    """Serving cannot start on this machine or with these options."""


def check_model_name(name: str) -> str:
    """A Triton model name: letters, digits, '_' and '-' (it names a directory of the repository)."""
    if not (name and name.isascii() and name.replace("_", "").replace("-", "").isalnum()):
        raise ServeError(f"--model-name {name!r} is not a model name; use letters, digits, '_' and '-'")
    return name


def python_library_dir() -> str:
    """The directory of this interpreter's shared libpython, which Triton's Python stub needs.

    Raises:
        ServeError: this Python was built without a shared libpython.
    """
    libdir, library = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") or not libdir or not (Path(libdir) / library).exists():
        raise ServeError("this Python has no shared libpython, which Triton's Python backend loads; serve from a "
                         "Python built with --enable-shared (pyenv: PYTHON_CONFIGURE_OPTS=--enable-shared)")
    return libdir


def triton_environment() -> None:
    """Put this interpreter's libpython first on LD_LIBRARY_PATH (read by the server PyTriton starts)."""
    libdir = python_library_dir()
    rest = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p != libdir]
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *rest])


def check_ports(host: str, port: int) -> None:
    """The HTTP and gRPC ports (port, port + 1) can be bound on host, before Triton starts."""
    for p in (port, port + 1):
        try:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind((host, p))
        except OSError as e:
            raise ServeError(f"cannot listen on {host}:{p} ({e.strerror}); the server needs ports --port and --port + 1 "
                             f"free on --host, so pass another --port or --host") from None


def tensors(table: dict, seq_len: int, inputs: bool):
    """PyTriton Tensor declarations of runtimes.serving's INPUTS or OUTPUTS (`table`)."""
    from pytriton.model_config import Tensor

    def shape(dims):
        return tuple(seq_len if d == "L" else d for d in dims)

    if inputs:
        return [Tensor(name=name, dtype=dtype, shape=shape(dims), optional=optional)
                for name, (dtype, dims, optional) in table.items()]
    return [Tensor(name=name, dtype=dtype, shape=shape(dims)) for name, (dtype, dims) in table.items()]


def serve(handler: Callable, model_name: str, seq_len: int, host: str, port: int, max_requests: int,
          queue_delay_us: int, on_ready: Callable[[], None], log: Callable[[str], None]) -> None:
    """Serve `handler` as model `model_name` until interrupted (Ctrl-C or SIGTERM).

    Args:
        handler: runtimes.serving.RequestHandler (a list of request arrays -> responses).
        seq_len: L, for the tokens output's shape.
        host: the address HTTP and gRPC listen on; port: HTTP's, gRPC takes port + 1 (Triton's
            8000 and 8001; metrics are off).
        max_requests: requests per dynamic batch; queue_delay_us: how long the batcher waits
            for more requests before it sends a batch on.
        on_ready: called once the model is ready; log: one line per dynamic batch served.
    """
    triton_environment()
    check_ports(host, port)
    from pytriton.exceptions import PyTritonError
    from pytriton.model_config import DynamicBatcher, ModelConfig
    from pytriton.triton import Triton, TritonConfig

    from runtimes.serving import INPUTS, OUTPUTS

    def infer(requests) -> list[dict[str, np.ndarray]]:
        start = time.perf_counter()
        responses = handler([dict(request.data) for request in requests])
        refused = sum("tokens" not in response for response in responses)
        log(f"served a batch of {len(requests)} requests ({refused} refused) in {time.perf_counter() - start:.3f} s")
        return responses

    config = TritonConfig(http_address=host, http_port=port, grpc_address=host, grpc_port=port + 1,
                          allow_metrics=False, exit_on_error=True)
    if len(tempfile.gettempdir()) > MAX_TMPDIR_CHARS:
        raise ServeError(f"the temporary directory {tempfile.gettempdir()} is too long a path for the server's Unix "
                         f"sockets (at most {MAX_TMPDIR_CHARS} characters); set TMPDIR to a shorter one, e.g. /tmp")
    scratch = Path(tempfile.mkdtemp(prefix="lddm-serve-"))   # PyTriton's workspace: the server's files
    try:
        with Triton(config=config, workspace=scratch / "workspace") as triton:
            triton.bind(model_name=model_name, infer_func=infer, inputs=tensors(INPUTS, seq_len, True),
                        outputs=tensors(OUTPUTS, seq_len, False), strict=True,
                        config=ModelConfig(max_batch_size=max_requests,
                                           batcher=DynamicBatcher(max_queue_delay_microseconds=queue_delay_us)))
            triton.run()
            on_ready()
            triton.serve()
    except PyTritonError as e:
        raise ServeError(f"Triton Inference Server stopped with an error ({str(e)[:200]}); its log above says why"
                         ) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
