"""`lddm-export serve` on the real Triton Inference Server (PyTriton's): started on loopback,
concurrent HTTP and gRPC requests are batched together, each equals `lddm-export sample` with
its seed, a bad request is refused alone, and SIGTERM stops the server cleanly."""
from __future__ import annotations

import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from fixtures import cached_tiny_bundle, run_cli, run_sample

pytest.importorskip("pytriton", reason="serving needs PyTriton: pip install 'lddm-export[serve]'")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from serve_client import request_inputs, response_fields  # noqa: E402

START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 60


def free_ports(count: int = 3) -> int:
    """A port p with p .. p + count - 1 free on loopback."""
    for _ in range(100):
        port = random.randrange(20_000, 60_000)
        try:
            for p in range(port, port + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
    raise RuntimeError("no free ports")


class Server:
    """`lddm-export serve` in a subprocess, its stderr collected line by line."""

    def __init__(self, bundle: Path, port: int, tmp: Path):
        env = {**os.environ, "TMPDIR": str(tmp)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lddm_export.cli", "serve", "--bundle", str(bundle), "--port", str(port),
             "--threads", "1", "--queue-delay-ms", "400", "--max-samples", "8"],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                assert self.process.poll() is None, "".join(self.log[-30:])
                continue
            self.log.append(line)
            if text in line:
                return
        raise AssertionError(f"no {text!r} within {timeout} s:\n{''.join(self.log[-30:])}")

    def drain(self) -> str:
        while not self.lines.empty():
            self.log.append(self.lines.get())
        return "".join(self.log)


@pytest.fixture
def short_tmp():
    """A TMPDIR short enough for the server's Unix socket paths (pytest's tmp_path is not)."""
    path = Path(tempfile.mkdtemp(dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_serve_batches_concurrent_requests_and_each_equals_sample(bundle_cache, tmp_path, short_tmp, capsys):
    import tritonclient.grpc as grpc
    import tritonclient.http as http

    bundle = cached_tiny_bundle(bundle_cache, "fuji", text=True)
    port = free_ports()
    server = Server(bundle, port, short_tmp)
    try:
        server.wait_for("serving", START_TIMEOUT_S)
        asks = [dict(seed=s, num=2, steps=4) for s in range(4)] + [dict(seed=9, num=3, steps=6),
                                                                      dict(seed=1, num=0, steps=4)]

        def ask(fields):
            with http.InferenceServerClient(f"127.0.0.1:{port}") as client:
                return response_fields(client.infer("lddm", request_inputs(http, **fields)))

        with ThreadPoolExecutor(len(asks)) as pool:
            answers = list(pool.map(ask, asks))
        with grpc.InferenceServerClient(f"127.0.0.1:{port + 1}") as client:
            prompted = response_fields(client.infer("lddm", request_inputs(grpc, 5, 2, 4, prompt="ab a")))
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(STOP_TIMEOUT_S) == 0
    finally:
        if server.process.poll() is None:
            server.process.kill()
    log = server.drain()
    assert "server stopped" in log and not list(short_tmp.glob("lddm-serve-*"))   # its workspace is gone
    batches = [int(line.split("batch of ")[1].split()[0]) for line in log.splitlines() if "served a batch" in line]
    assert max(batches) >= 2, log[-3000:]                # concurrent requests shared a call
    assert sum(batches) == len(asks) + 1

    assert "num must be a positive integer, got 0" in answers[-1]["error"] and answers[-1]["tokens"] is None
    for fields, answer in [*zip(asks[:-1], answers), (dict(seed=5, num=2, steps=4, prompt="ab a"), prompted)]:
        out = tmp_path / f"{fields['seed']}.npy"
        prompt = ["--prompt", fields["prompt"]] if "prompt" in fields else []
        code, _ = run_sample(capsys, "--bundle", str(bundle), "--steps", str(fields["steps"]), "--num",
                             str(fields["num"]), "--seed", str(fields["seed"]), "--out", str(out), *prompt)
        assert code == 0 and answer["error"] == ""
        assert np.array_equal(answer["tokens"], np.load(out)), fields
        assert len(answer["text"]) == fields["num"] and all(answer["text"])
    assert answers[0]["text"] != answers[1]["text"]
    assert prompted["text"][0].startswith("ab a")


def test_serve_refuses_a_port_in_use(bundle_cache, capsys):
    bundle = cached_tiny_bundle(bundle_cache, "mdlm")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1] - 1          # its gRPC port is taken
        code, _, err = run_cli(capsys, "serve", "--bundle", bundle, "--port", port)
    assert code == 1
    assert f"cannot listen on 127.0.0.1:{port + 1}" in err and "pass another --port" in err
    assert "Traceback" not in err


def test_serve_refuses_a_python_without_libpython_and_a_long_tmpdir(bundle_cache, tmp_path, capsys, monkeypatch):
    import sysconfig

    from lddm_export import serve

    bundle = cached_tiny_bundle(bundle_cache, "mdlm")
    long_tmp = tmp_path / ("x" * 60)
    long_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(long_tmp))
    code, _, err = run_cli(capsys, "serve", "--bundle", bundle, "--port", free_ports())
    assert code == 1 and "too long a path for the server's Unix sockets" in err
    assert "set TMPDIR to a shorter one" in err and "Traceback" not in err and list(long_tmp.iterdir()) == []

    real = sysconfig.get_config_var
    monkeypatch.setattr(sysconfig, "get_config_var", lambda name: 0 if name == "Py_ENABLE_SHARED" else real(name))
    with pytest.raises(serve.ServeError, match="this Python has no shared libpython"):
        serve.python_library_dir()
