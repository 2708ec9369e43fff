"""`lddm-export triton-repo`: its configs parse as Triton ModelConfigs and say what the bundle
is, and the repository, with its graphs on the Python backend, runs on a real tritonserver (the
one PyTriton bundles, which has no ONNX Runtime or TensorRT backend): the BLS sampler model
calls the graph models and its samples equal `lddm-export sample`'s."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from fixtures import cached_full_bundle, cached_tiny_bundle, run_cli, run_sample
from runtimes.bundle import Bundle
from runtimes.serving import INPUTS, OUTPUTS

pytest.importorskip("pytriton", reason="Triton configs and the server need lddm-export[serve]")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from serve_client import request_inputs, response_fields  # noqa: E402
from test_serve import free_ports  # noqa: E402

GRAPHS = {"fuji": ("trunk", "head"), "seq": ("latent_denoiser", "trunk", "head"), "mdlm": ("trunk", "head")}


def write_repo(capsys, bundle: Path, out: Path, *options: str) -> str:
    code, out_text, err = run_cli(capsys, "triton-repo", "--bundle", bundle, "--out", out, *options)
    assert code == 0, err
    return out_text


def read_config(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("variant", ["seq"])   # every kind of sampler graph: the latent denoiser, trunk, head
def test_configs_parse_and_describe_the_bundle(variant, bundle_cache, tmp_path, capsys):
    from tritonclient.grpc import model_config_pb2 as mc

    bundle = Bundle.open(cached_tiny_bundle(bundle_cache, variant, text=True))
    repo = tmp_path / "repo"
    write_repo(capsys, bundle.root, repo, "--instances", "2", "--queue-delay-ms", "7")
    assert sorted(p.name for p in repo.iterdir()) == sorted(["lddm", *(f"lddm_{g}" for g in GRAPHS[variant])])

    sampler = read_config(repo / "lddm" / "config.pbtxt")
    assert sampler.backend == "python" and sampler.max_batch_size == 64
    assert [i.name for i in sampler.input] == list(INPUTS) and [o.name for o in sampler.output] == list(OUTPUTS)
    assert {i.name for i in sampler.input if i.optional} == {n for n, (_, _, opt) in INPUTS.items() if opt}
    assert list(next(o for o in sampler.output if o.name == "tokens").dims) == [-1, bundle.shapes["L"]]
    assert sampler.dynamic_batching.max_queue_delay_microseconds == 7000
    assert [(g.count, g.kind) for g in sampler.instance_group] == [(2, mc.ModelInstanceGroup.KIND_GPU)]
    assert sampler.parameters["graph_model_prefix"].string_value == "lddm_"
    assert (repo / "lddm" / "1" / "model.py").is_file() and (repo / "lddm" / "1" / "manifest.json").is_file()

    for graph in GRAPHS[variant]:
        config, spec = read_config(repo / f"lddm_{graph}" / "config.pbtxt"), bundle.spec(graph)
        assert config.platform == "onnxruntime_onnx" and config.HasField("dynamic_batching")
        assert config.max_batch_size == bundle.profile(graph)["max"]   # the head: its rows, B_max x L
        for field, tensors in ((config.input, spec.inputs), (config.output, spec.outputs)):
            assert [t.name for t in field] == [t.name for t in tensors]
            for ours, theirs in zip(field, tensors):
                assert list(ours.dims) == (list(theirs.shape[1:]) or [1])
                assert ours.HasField("reshape") == (len(theirs.shape) == 1)   # t: [B] -> dims [1], reshape []
        model = repo / f"lddm_{graph}" / "1" / "model.onnx"
        assert hashlib.sha256(model.read_bytes()).hexdigest() == bundle.manifest["files"][
            bundle.manifest["graphs"][graph]["onnx"]["fp32"]]


def test_refusals(bundle_cache, tmp_path, capsys):
    bundle = cached_tiny_bundle(bundle_cache, "fuji", text=True)
    (tmp_path / "taken").mkdir()
    (tmp_path / "a-file").write_text("mine")
    cases = [
        (["--out", str(tmp_path / "taken")], "exists; pass --force to replace it"),
        (["--out", str(tmp_path / "r"), "--precision", "fp16"], "has no fp16 graph"),
        (["--out", str(tmp_path / "r"), "--graph-backend", "tensorrt"], "has no fp32 TensorRT engines"),
        (["--out", str(tmp_path / "r"), "--model-name", "../x"], "is not a model name"),
        (["--out", str(bundle), "--force"], "holds the bundle being read"),
        (["--out", str(bundle.parent), "--force"], "holds the bundle being read"),
        (["--out", str(tmp_path / "a-file"), "--force"], "exists and is not a directory; choose another --out"),
    ]
    for options, message in cases:
        code, _, err = run_cli(capsys, "triton-repo", "--bundle", bundle, *options)
        assert code == 1 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "r").exists() and list((tmp_path / "taken").iterdir()) == []
    assert (tmp_path / "a-file").read_text() == "mine" and not list(tmp_path.glob(".a-file.*"))


def local_tritonserver(work: Path) -> tuple[Path, Path, dict]:
    """PyTriton's tritonserver, its backends with this Python's stub, and the environment it needs."""
    from pytriton.utils.distribution import get_libs_path, get_stub_path

    dist = Path(sys.modules["pytriton"].__file__).parent / "tritonserver"
    backends = work / "backends"
    shutil.copytree(dist / "backends", backends)
    shutil.copy(get_stub_path(f"{sys.version_info[0]}.{sys.version_info[1]}"),
                backends / "python" / "triton_python_backend_stub")
    env = {**os.environ, "TMPDIR": str(work),
           "LD_LIBRARY_PATH": f"{sysconfig.get_config_var('LIBDIR')}:{get_libs_path()}",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return dist / "bin" / "tritonserver", backends, env


def test_the_repository_serves_on_tritonserver_and_equals_sample(bundle_cache, tmp_path, capsys):
    import tritonclient.http as http

    bundle = cached_tiny_bundle(bundle_cache, "fuji", text=True)
    work = Path(tempfile.mkdtemp(dir="/tmp"))    # short: the stubs' Unix sockets live under TMPDIR
    try:
        repo = work / "repo"
        write_repo(capsys, bundle, repo, "--graph-backend", "python", "--kind", "cpu", "--queue-delay-ms", "300")
        binary, backends, env = local_tritonserver(work)
        port = free_ports()
        log = (work / "tritonserver.log").open("w")
        server = subprocess.Popen([str(binary), "--model-repository", str(repo), "--backend-directory", str(backends),
                                   "--http-address", "127.0.0.1", "--http-port", str(port), "--grpc-address",
                                   "127.0.0.1", "--grpc-port", str(port + 1), "--allow-metrics", "false"],
                                  stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            client = http.InferenceServerClient(f"127.0.0.1:{port}")
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and server.poll() is None:
                try:
                    if client.is_model_ready("lddm"):
                        break
                except Exception:   # not listening yet
                    pass
                time.sleep(0.5)
            assert client.is_model_ready("lddm"), (work / "tritonserver.log").read_text()[-4000:]
            asks = [dict(seed=s, num=2, steps=4) for s in range(3)] + [dict(seed=1, num=300, steps=4)]
            client.close()

            def ask(fields):
                with http.InferenceServerClient(f"127.0.0.1:{port}") as one:
                    return response_fields(one.infer("lddm", request_inputs(http, **fields)))

            with ThreadPoolExecutor(len(asks)) as pool:
                answers = list(pool.map(ask, asks))
            server.send_signal(signal.SIGTERM)   # with no connection left open, it stops at once
            assert server.wait(60) == 0, (work / "tritonserver.log").read_text()[-3000:]
        finally:
            if server.poll() is None:
                server.kill()
        assert "num 300 is above the limit of 256" in answers[-1]["error"]
        for fields, answer in zip(asks[:-1], answers):
            out = tmp_path / f"{fields['seed']}.npy"
            code, _ = run_sample(capsys, "--bundle", str(bundle), "--steps", "4", "--num", "2", "--seed",
                                 str(fields["seed"]), "--out", str(out))
            assert code == 0 and answer["error"] == ""
            assert np.array_equal(answer["tokens"], np.load(out))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_tensorrt_graph_models_take_the_bundles_engines_of_one_gpu(bundle_cache, tmp_path, capsys, monkeypatch):
    """Bookkeeping only (placeholder engine files, no TensorRT, as test_build's engine tests):
    auto picks tensorrt_plan where every graph has an engine, copies each graph's own engine, and
    a precision with engines for two GPUs is refused, since an engine runs only where it was built."""
    from lddm_export import build, engines
    from runtimes.cuda_util import GpuIdentity
    from test_build import fake_engine_builder

    bundle = shutil.copytree(cached_full_bundle(bundle_cache, "fuji")[0], tmp_path / "bundle")
    server, jetson = GpuIdentity("NVIDIA H100 80GB HBM3", "9.0"), GpuIdentity("Orin", "8.7")
    for gpu, precision in ((server, "fp32,fp16"), (jetson, "fp16")):
        monkeypatch.setattr(engines, "build_engines", fake_engine_builder(gpu, "10.3.0", gpu.name.encode()))
        build.build_engines_for_bundle(bundle, build.parse_options(engines="on", precision=precision),
                                       log=lambda line: None)
    write_repo(capsys, bundle, tmp_path / "repo")          # fp32: the H100's engines only
    manifest = Bundle.open(bundle).manifest
    for graph in GRAPHS["fuji"]:
        assert read_config(tmp_path / "repo" / f"lddm_{graph}" / "config.pbtxt").platform == "tensorrt_plan"
        engine = next(e for e in manifest["engines"] if e["graph"] == graph and e["precision"] == "fp32")
        copied = tmp_path / "repo" / f"lddm_{graph}" / "1" / "model.plan"
        assert copied.read_bytes() == (bundle / engine["file"]).read_bytes() == b"NVIDIA H100 80GB HBM3"
    code, _, err = run_cli(capsys, "triton-repo", "--bundle", bundle, "--out", tmp_path / "r16", "--precision", "fp16")
    assert code == 1 and "engines of graph 'trunk' for several GPUs (NVIDIA H100 80GB HBM3, Orin)" in err
    assert not (tmp_path / "r16").exists()
