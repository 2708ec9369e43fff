"""Which calls the GPU paths make, checked with recording doubles of tensorrt, onnxruntime and the
torch.cuda calls around them (these run everywhere), and the ONNX Runtime CUDA provider against
its CPU provider (marker gpu: where onnxruntime-gpu and a CUDA GPU exist).

The doubles only record calls and answer with what the code must handle (None, False, a
provider list, a failing capture). They never stand in for an engine's numerics: the "plan"
they build is a placeholder no test reads, and parity is tested only on real engines and
sessions (tests/runtimes/test_tensorrt.py, the gpu test below).
"""
from __future__ import annotations

import contextlib
import json
import sys
import types
import warnings
from pathlib import Path

import onnx
import pytest
import torch

from lddm_export import engines
from lddm_export.engines import build_engines, default_timing_cache
from runtimes.backends.ort_runner import OrtRunner, ort_trt_cache_dir
from runtimes.backends.trt_runner import TrtRunner, bind_context, capture_graph
from runtimes.bundle import Bundle, sha256_file
from runtimes.cuda_util import GpuIdentity, cache_root, onnx_sha256
from runtimes.errors import BackendUnavailable, EngineBuildError
from test_tensorrt import PROFILE, L, V, feed, make_bundle, tiny_graph, write_manifest

GPU = GpuIdentity("Recording GPU", "8.7")


# --- tensorrt: the engine builder

def fake_tensorrt(log: list) -> types.ModuleType:
    """A tensorrt module whose builder records its calls in `log` and builds a placeholder plan."""

    class Config:
        def clear_flag(self, flag):
            log.append(("clear_flag", flag))

        def set_memory_pool_limit(self, pool, pool_size):
            log.append(("set_memory_pool_limit", pool, pool_size))

        def add_optimization_profile(self, profile):
            log.append(("add_optimization_profile",))

        def create_timing_cache(self, serialized_timing_cache):
            return types.SimpleNamespace(serialize=lambda: b"timings")

        def set_timing_cache(self, cache, ignore_mismatch):
            return True

    class Profile:
        def set_shape(self, input, min, opt, max):
            log.append(("set_shape", input, min, opt, max))

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return "network"

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            log.append(("build_serialized_network",))
            return b"placeholder, not an engine"

    class OnnxParser:
        num_errors = 0

        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            log.append(("parse_from_file", Path(path).name))
            return True

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.3.0"
    trt.Builder, trt.OnnxParser = Builder, OnnxParser
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0)
    trt.BuilderFlag = types.SimpleNamespace(TF32="BuilderFlag.TF32")
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="MemoryPoolType.WORKSPACE")
    return trt


@pytest.fixture
def recorded_build(monkeypatch):
    """The call log of a fake tensorrt installed for lddm_export.engines, on a fake GPU."""
    log = []
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt(log))
    monkeypatch.setattr(engines, "gpu_identity", lambda: GPU)
    monkeypatch.setattr(engines, "tensorrt_logger", lambda: None)
    return log


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def test_tf32_is_cleared_and_the_batch_profile_set_for_every_engine(tmp_path, recorded_build):
    root = make_bundle(tmp_path / "b")
    build_engines(root, _manifest(root), ["fp32", "fp16"], PROFILE, log=lambda line: None,
                  timing_cache=tmp_path / "timing.cache")
    builds = [i for i, call in enumerate(recorded_build) if call[0] == "build_serialized_network"]
    graphs = [g for g in ("denoiser", "trunk", "head") for _ in ("fp32", "fp16")]   # the engines, in order
    assert len(builds) == len(graphs)
    start = 0
    for graph, end in zip(graphs, builds):          # each engine's own config, before its build
        calls = recorded_build[start:end]
        assert ("clear_flag", "BuilderFlag.TF32") in calls
        if graph == "head":                         # rows: 1 .. max batch x L (W = V here)
            assert ("set_shape", "hidden", (1, V), (max(1, 2 * L // 16), V), (4 * L, V)) in calls
        else:
            assert ("set_shape", "x_t", (1, L), (2, L), (4, L)) in calls
            assert ("set_shape", "t", (1,), (2,), (4,)) in calls
        start = end


def test_an_unwritable_timing_cache_keeps_the_built_engine(tmp_path, recorded_build):
    root = make_bundle(tmp_path / "b")
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.warns(RuntimeWarning, match=r"could not save the TensorRT timing cache .*the engine is kept"):
        entries = build_engines(root, _manifest(root), ["fp32"], PROFILE, log=lambda line: None,
                                timing_cache=tmp_path / "a-file" / "timing.cache")
    assert [(e["graph"], e["precision"]) for e in entries] == [(g, "fp32") for g in ("denoiser", "trunk", "head")]
    assert all((root / e["file"]).is_file() for e in entries)


def test_the_default_timing_cache_is_in_the_users_cache_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert cache_root() == tmp_path / "cache" / "lddm-export"
    assert default_timing_cache(GPU, "10.3.0").parent == cache_root()


def _external_data_bundle(root: Path) -> Path:
    """make_bundle, with the fp32 graph's weights moved to onnx/denoiser.fp32.onnx.data."""
    make_bundle(root)
    onnx.save_model(tiny_graph("denoiser", fp16=False), str(root / "onnx/denoiser.fp32.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="denoiser.fp32.onnx.data", size_threshold=0)
    write_manifest(root, _manifest(root))
    return root


def test_the_engine_hash_covers_external_data(tmp_path, recorded_build):
    root = _external_data_bundle(tmp_path / "b")
    graph, data = root / "onnx/denoiser.fp32.onnx", root / "onnx/denoiser.fp32.onnx.data"
    entries = build_engines(root, _manifest(root), ["fp32"], PROFILE, log=lambda line: None,
                            timing_cache=tmp_path / "timing.cache")
    entry = next(e for e in entries if e["graph"] == "denoiser")
    assert entry["onnx_sha256"] == onnx_sha256(graph) != sha256_file(graph)
    data.write_bytes(data.read_bytes()[::-1])                  # other weights, same .onnx file
    assert onnx_sha256(graph) != entry["onnx_sha256"]
    assert onnx_sha256(root / "onnx/denoiser.fp16.onnx") == sha256_file(root / "onnx/denoiser.fp16.onnx")


# --- tensorrt: the runner

class Stream:
    """A CUDA stream double: a handle, a device, and a log of synchronize() calls."""

    def __init__(self, device=None, handle: int = 0xBEEF):
        self.device, self.cuda_stream, self.synchronized = device, handle, []

    def synchronize(self):
        self.synchronized.append(True)


class Context:
    """An execution-context double that records its calls and answers set_tensor_address with `address_ok`."""

    def __init__(self, log: list, output_shapes: dict, address_ok: bool = True, runs: bool = True):
        self.log, self.output_shapes, self.address_ok, self.runs = log, output_shapes, address_ok, runs

    def set_device_memory(self, memory, size):
        self.log.append(("set_device_memory", memory, size))

    def set_input_shape(self, name, shape):
        self.log.append(("set_input_shape", name, shape))
        return True

    def get_tensor_shape(self, name):
        return self.output_shapes[name]

    def set_tensor_address(self, name, memory):
        self.log.append(("set_tensor_address", name, memory))
        return self.address_ok

    def execute_async_v3(self, stream_handle):
        self.log.append(("execute_async_v3", stream_handle))
        return self.runs


def _buffers(batch: int = 2):
    inputs = {"x_t": torch.zeros(batch, L, dtype=torch.int64), "t": torch.zeros(batch)}
    return inputs, {"log_probs": torch.zeros(batch, L, V)}


def _engine(log: list, context):
    def create_execution_context(strategy):
        log.append(("create_execution_context", strategy))
        return context
    return types.SimpleNamespace(create_execution_context=create_execution_context)


def test_contexts_are_user_managed_and_run_in_the_shared_scratch():
    log = []
    inputs, outputs = _buffers()
    scratch = torch.empty(4096, dtype=torch.uint8)
    context = Context(log, {"log_probs": (2, L, V)})
    assert bind_context(_engine(log, context), "USER_MANAGED", scratch, inputs, outputs, "denoiser") is context
    assert log[:2] == [("create_execution_context", "USER_MANAGED"), ("set_device_memory", scratch.data_ptr(), 4096)]
    assert ("set_input_shape", "x_t", (2, L)) in log and ("set_input_shape", "t", (2,)) in log
    bound = {call[1]: call[2] for call in log if call[0] == "set_tensor_address"}
    assert bound == {name: t.data_ptr() for name, t in {**inputs, **outputs}.items()}


def test_no_execution_context_is_a_clear_error():
    with pytest.raises(EngineBuildError, match=r"could not create an execution context for graph 'denoiser'.*--batch"):
        bind_context(_engine([], None), "USER_MANAGED", torch.empty(1, dtype=torch.uint8), *_buffers(), "denoiser")


def test_a_refused_tensor_address_is_a_clear_error():
    context = Context([], {"log_probs": (2, L, V)}, address_ok=False)
    with pytest.raises(EngineBuildError, match=r"refused the device address of tensor 'x_t' of graph 'denoiser'"):
        bind_context(_engine([], context), "USER_MANAGED", torch.empty(1, dtype=torch.uint8), *_buffers(), "denoiser")


@pytest.fixture
def fake_capture(monkeypatch):
    """torch.cuda's graph calls replaced; returns (caller stream, set_stream log, set the capture's failure)."""
    caller, current = Stream(handle=0), []
    failure = {}

    @contextlib.contextmanager
    def graph(cuda_graph, stream=None, capture_error_mode=None):
        yield
        if failure:                        # as torch's capture_end raises when the capture was invalidated
            raise RuntimeError(failure["message"])

    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: "captured graph")
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: caller)
    monkeypatch.setattr(torch.cuda, "set_stream", current.append)
    return caller, current, failure


def test_a_successful_capture_returns_its_graph(fake_capture):
    caller, current, _ = fake_capture
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert capture_graph(Context([], {}), Stream(), "denoiser") == "captured graph"
    assert current == [caller]


@pytest.mark.parametrize("failure, reason", [
    ("CUDA error: operation not permitted when stream is capturing", "CUDA error: operation not permitted"),
    (None, "execute_async_v3 returned False"),
])
def test_a_failed_capture_falls_back_to_running_without_a_graph(fake_capture, failure, reason):
    caller, current, raised = fake_capture
    if failure:
        raised["message"] = failure
    context = Context([], {}, runs=failure is not None)
    message = rf"graph 'denoiser' inside a CUDA graph capture \({reason}.*without CUDA graphs"
    with pytest.warns(RuntimeWarning, match=message):
        assert capture_graph(context, Stream(), "denoiser") is None
    assert current == [caller]                       # the caller's stream is current again


def test_deactivate_waits_for_the_stream_before_freeing(tmp_path):
    runner = TrtRunner(Bundle.open(make_bundle(tmp_path / "b"), check_hashes=False), "denoiser", "fp16")
    stream = Stream()
    stream.synchronize = lambda: stream.synchronized.append(len(runner._batches))
    runner._stream, runner._batches, runner.is_active = stream, {2: "a batch's context and graph"}, True
    runner.deactivate()
    assert stream.synchronized == [1] and runner._batches == {} and runner._stream is None


# --- onnxruntime

def fake_onnxruntime(got: list[str], log: list) -> types.ModuleType:
    """An onnxruntime module whose InferenceSession records its providers argument and reports `got`."""

    class InferenceSession:
        def __init__(self, path, sess_options=None, providers=None):
            log.append(providers)

        def get_providers(self):
            return list(got)

    ort = types.ModuleType("onnxruntime")
    ort.__version__ = "1.18.0"
    ort.InferenceSession, ort.SessionOptions = InferenceSession, types.SimpleNamespace
    ort.GraphOptimizationLevel = types.SimpleNamespace(ORT_ENABLE_ALL=99)
    ort.get_available_providers = lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    return ort


@pytest.fixture
def recorded_ort(monkeypatch, tmp_path):
    """Install a fake onnxruntime reporting `got` providers; returns (install(got) -> log, stream)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("NVIDIA_TF32_OVERRIDE", raising=False)
    stream = Stream()
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: stream)

    def install(got: list[str]) -> list:
        log = []
        monkeypatch.setitem(sys.modules, "onnxruntime", fake_onnxruntime(got, log))
        return log
    return install, stream


@pytest.fixture
def bundle(tmp_path) -> Bundle:
    return Bundle.open(make_bundle(tmp_path / "b"), check_hashes=False)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_the_cuda_provider_runs_without_tf32_on_the_runners_own_stream(bundle, recorded_ort, precision):
    install, stream = recorded_ort
    log = install(["CUDAExecutionProvider", "CPUExecutionProvider"])
    runner = OrtRunner(bundle, "denoiser", precision, "cuda").activate()
    # The runner's own stream, never 0: that is "none" to the CUDA provider but the legacy default
    # stream to the TensorRT provider.
    assert log == [[("CUDAExecutionProvider", {"device_id": 0, "use_tf32": 0, "user_compute_stream": str(0xBEEF)})]]
    runner.deactivate()
    assert stream.synchronized == [True]


@pytest.mark.parametrize("provider, got", [
    ("cuda", ["CPUExecutionProvider"]),
    ("tensorrt", ["CUDAExecutionProvider", "CPUExecutionProvider"]),
])
def test_a_provider_that_fell_back_is_refused(bundle, recorded_ort, provider, got):
    install, _ = recorded_ort
    install(got)
    runner = OrtRunner(bundle, "denoiser", "fp16", "cuda", provider)
    with pytest.raises(BackendUnavailable, match=rf"could not start \w+ExecutionProvider for denoiser.fp16.onnx "
                                                 rf"and fell back to \['{got[0]}'.*onnxruntime-gpu 1.18.0"):
        runner.activate()
    assert not runner.is_active and runner.session is None


def test_the_tensorrt_provider_caches_outside_the_bundle_with_the_batch_profile(bundle, recorded_ort, tmp_path):
    install, _ = recorded_ort
    log = install(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    before = sorted(p.relative_to(bundle.root) for p in bundle.root.rglob("*"))
    OrtRunner(bundle, "denoiser", "fp16", "cuda", "tensorrt").activate()
    (name, trt), (fallback, cuda) = log[0]
    assert (name, fallback) == ("TensorrtExecutionProvider", "CUDAExecutionProvider")
    cache = Path(trt["trt_engine_cache_path"])
    assert cache == ort_trt_cache_dir(bundle.onnx_path("denoiser", "fp16")) and cache.is_dir()
    assert cache.parent == Path(trt["trt_timing_cache_path"]) and cache.parent.parent == cache_root()
    assert cache_root() == tmp_path / "cache" / "lddm-export"
    assert trt["trt_engine_cache_enable"] and trt["trt_timing_cache_enable"] and trt["trt_fp16_enable"]
    assert trt["trt_profile_min_shapes"] == f"x_t:1x{L},t:1"
    assert trt["trt_profile_opt_shapes"] == f"x_t:2x{L},t:2"
    assert trt["trt_profile_max_shapes"] == f"x_t:4x{L},t:4"
    assert sorted(p.relative_to(bundle.root) for p in bundle.root.rglob("*")) == before


def test_the_tensorrt_provider_cache_follows_the_weights(tmp_path):
    root = _external_data_bundle(tmp_path / "b")
    before = ort_trt_cache_dir(root / "onnx/denoiser.fp32.onnx")
    data = root / "onnx/denoiser.fp32.onnx.data"
    data.write_bytes(data.read_bytes()[::-1])
    assert ort_trt_cache_dir(root / "onnx/denoiser.fp32.onnx") != before


@pytest.mark.parametrize("override, warns", [(None, True), ("0", False)])
def test_fp32_on_the_tensorrt_provider_warns_about_tf32(bundle, recorded_ort, monkeypatch, override, warns):
    install, _ = recorded_ort
    install(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    if override is not None:
        monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", override)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        OrtRunner(bundle, "denoiser", "fp32", "cuda", "tensorrt").activate()
    assert any("NVIDIA_TF32_OVERRIDE=0" in str(w.message) for w in caught) == warns


# --- where onnxruntime-gpu and a CUDA GPU exist: the real CUDA provider

@pytest.mark.gpu
@pytest.mark.parametrize("precision, atol", [("fp32", 1e-5), ("fp16", 2e-2)])
def test_the_cuda_provider_matches_the_cpu_provider(bundle, precision, atol):
    import onnxruntime as ort
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
    cpu, gpu = (OrtRunner(bundle, "denoiser", precision, device) for device in ("cpu", "cuda"))
    with cpu, gpu:
        for batch, seed in [(1, 0), (3, 1), (4, 2)]:
            inputs = feed(batch, seed)
            want = cpu.infer(inputs)["log_probs"]
            got = gpu.infer({k: v.cuda() for k, v in inputs.items()})["log_probs"]
            assert got.device.type == "cuda"
            torch.testing.assert_close(got.cpu(), want, atol=atol, rtol=0)
