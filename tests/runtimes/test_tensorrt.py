"""TensorRT: engine naming, the pre-deserialisation manifest check, clear errors without TensorRT
(these run everywhere), and real engine builds compared with ONNX Runtime (marker trt: these run
where tensorrt imports and a CUDA GPU exists).

The engines are built from tiny hand-written ONNX graphs with the MDLM graphs' signatures
(denoiser: x_t int64 [B, L], t float32 [B] -> log_probs float32 [B, L, V]; trunk: the same
inputs -> hidden [B, L, W]; head: hidden [N, W] -> log_probs [N, V]; W = V) in FP32 and in FP16
with casts at their edges, so these tests depend on nothing but onnx.
"""
from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from lddm_export.engines import build_engines, engine_file_name, profile_shapes, tensorrt_available
from runtimes.backends.trt_runner import TrtRunner, select_engine_entry
from runtimes.bundle import Bundle, sha256_file
from runtimes.cuda_util import GpuIdentity, gpu_identity
from runtimes.errors import BackendUnavailable, EngineBuildError, ShapeMismatch
from runtimes.spec import graph_specs

L, V = 6, 5
PROFILE = {"min": 1, "opt": 2, "max": 4}


# --- a tiny bundle

def tiny_graph(graph: str, fp16: bool, hidden: int = 0) -> onnx.ModelProto:
    """denoiser: log_probs = log_softmax(E[x_t] + t * w), FP16 compute between casts when fp16;
    trunk: hidden = E[x_t] + t * w; head: log_probs = log_softmax(hidden) (W = V).

    With hidden = H > 0, E is [V, H] and two MatMuls follow the Gather, E[x_t] @ W1 @ W2 (W1 [H, H],
    W2 [H, V], both scaled by 1/sqrt(H)): wide enough that TF32 would show at 1e-4.
    """
    rng = np.random.default_rng(0)
    dtype, onnx_type = (np.float16, TensorProto.FLOAT16) if fp16 else (np.float32, TensorProto.FLOAT)
    if graph == "head":
        nodes = [helper.make_node("Cast", ["hidden"], ["h"], to=onnx_type),
                 helper.make_node("Cast", ["h"], ["h32"], to=TensorProto.FLOAT),
                 helper.make_node("LogSoftmax", ["h32"], ["log_probs"], axis=-1)]
        return _model(nodes, [], [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["N", V])],
                      [helper.make_tensor_value_info("log_probs", TensorProto.FLOAT, ["N", V])])
    inits = [numpy_helper.from_array(rng.standard_normal((V, hidden or V)).astype(dtype), "E"),
             numpy_helper.from_array(rng.standard_normal(V).astype(dtype), "w"),
             numpy_helper.from_array(np.array([1, 2], np.int64), "axes")]
    nodes = [helper.make_node("Gather", ["E", "x_t"], ["emb" if not hidden else "e"])]   # (B, L, H or V)
    if hidden:
        scale = 1 / np.sqrt(hidden)
        inits += [numpy_helper.from_array((rng.standard_normal((hidden, hidden)) * scale).astype(dtype), "W1"),
                  numpy_helper.from_array((rng.standard_normal((hidden, V)) * scale).astype(dtype), "W2")]
        nodes += [helper.make_node("MatMul", ["e", "W1"], ["e1"]),                 # (B, L, H)
                  helper.make_node("MatMul", ["e1", "W2"], ["emb"])]               # (B, L, V)
    nodes += [helper.make_node("Cast", ["t"], ["t_c"], to=onnx_type),
             helper.make_node("Unsqueeze", ["t_c", "axes"], ["t3"]),               # (B, 1, 1)
             helper.make_node("Mul", ["t3", "w"], ["tw"]),                         # (B, 1, V)
             helper.make_node("Add", ["emb", "tw"], ["h"]),
             helper.make_node("Cast", ["h"], ["h32" if graph == "denoiser" else "hidden"], to=TensorProto.FLOAT)]
    if graph == "denoiser":
        nodes.append(helper.make_node("LogSoftmax", ["h32"], ["log_probs"], axis=-1))
    output = "log_probs" if graph == "denoiser" else "hidden"
    return _model(nodes, inits, [helper.make_tensor_value_info("x_t", TensorProto.INT64, ["B", L]),
                                 helper.make_tensor_value_info("t", TensorProto.FLOAT, ["B"])],
                  [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["B", L, V])])


def _model(nodes, inits, inputs, outputs) -> onnx.ModelProto:
    model = helper.make_model(helper.make_graph(nodes, "tiny", inputs, outputs, inits),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def make_bundle(root: Path, hidden: int = 0) -> Path:
    """A bundle directory with the tiny graphs (see tiny_graph) in fp32 and fp16 and a manifest, no engines."""
    (root / "onnx").mkdir(parents=True)
    specs = graph_specs("mdlm", L, 1, 1, V, V)
    graphs = {}
    for graph, spec in specs.items():
        graphs[graph] = {**spec.to_dict(), "onnx": {}}
        for precision in ("fp32", "fp16"):
            graphs[graph]["onnx"][precision] = f"onnx/{graph}.{precision}.onnx"
            onnx.save(tiny_graph(graph, precision == "fp16", hidden), str(root / graphs[graph]["onnx"][precision]))
    schedule = {"mask": {"kind": "loglinear", "eps": 1e-3}, "latent": {"kind": "sqrt", "eps": 1e-4}}
    config = {"variant": "mdlm", "vocab_size": V - 1, "seq_len": L, "n_latent": 1, "latent_dim": 1, "width": V,
              "mask_schedule": "loglinear", "mask_eps": 1e-3, "latent_schedule": "sqrt", "latent_eps": 1e-4}
    manifest = {"format": "lddm-bundle", "version": 2, "variant": "mdlm", "config": config,
                "shapes": {"L": L, "P": 1, "D": 1, "V": V, "W": V, "mask_id": V - 1}, "schedule": schedule,
                "graphs": graphs, "head": "trunk+head",
                "batch_profile": dict(PROFILE), "opset": 18, "engines": [], "tokenizer": None, "data": None,
                "checkpoint": {"path": "/nonexistent/model.pt", "sha256": "0" * 64}, "files": {}, "tools": {}}
    write_manifest(root, manifest)
    return root


def write_manifest(root: Path, manifest: dict) -> None:
    """Write manifest.json with its files table listing every file of the bundle but the manifest."""
    manifest["files"] = {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*"))
                         if p.is_file() and p.name != "manifest.json"}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))


def feed(batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"x_t": torch.randint(0, V, (batch, L), generator=g), "t": torch.rand(batch, generator=g)}


# --- everywhere: names, profiles, the manifest check, errors without TensorRT

def test_engine_file_names_are_filesystem_safe_and_carry_gpu_and_version():
    h100 = GpuIdentity("NVIDIA H100 80GB HBM3", "9.0")
    assert engine_file_name("denoiser", "fp16", h100, "10.3.0") == \
        "engines/denoiser.fp16.nvidia-h100-80gb-hbm3-sm90.trt10.3.0.plan"
    assert GpuIdentity("Orin", "8.7").tag == "orin-sm87"
    assert GpuIdentity("NVIDIA GeForce RTX 4090 / (custom) ", "8.9").tag == "nvidia-geforce-rtx-4090-custom-sm89"


def test_profile_shapes_put_min_opt_max_on_the_batch_axis_only():
    x_t = {"name": "x_t", "dtype": "int64", "shape": ["B", 128]}
    y_t = {"name": "y_t", "dtype": "float32", "shape": ["B", 4, 8]}
    assert profile_shapes(x_t, {"min": 1, "opt": 8, "max": 64}) == ((1, 128), (8, 128), (64, 128))
    assert profile_shapes(y_t, {"min": 2, "opt": 3, "max": 5}) == ((2, 4, 8), (3, 4, 8), (5, 4, 8))


def _entry(**changes) -> dict:
    entry = {"graph": "denoiser", "precision": "fp16", "file": "engines/denoiser.fp16.orin-sm87.trt10.3.0.plan",
             "onnx_file": "onnx/denoiser.fp16.onnx", "onnx_sha256": "a" * 64, "trt_version": "10.3.0",
             "gpu_name": "Orin", "compute_capability": "8.7", "profile": dict(PROFILE)}
    return {**entry, **changes}


def _select(engines, precision="fp16", sha="a" * 64, version="10.3.0", cc="8.7", name="Orin"):
    return select_engine_entry("/b", engines, "denoiser", precision, sha, version, GpuIdentity(name, cc))


def test_the_engine_that_fits_this_machine_is_chosen():
    server = _entry(file="engines/x.plan", gpu_name="NVIDIA H100", compute_capability="9.0", trt_version="11.4.0.106")
    jetson = _entry()
    assert _select([server, jetson]) is jetson
    assert _select([server, jetson], version="11.4.0.106", cc="9.0", name="NVIDIA H100") is server


def test_an_engine_built_on_a_gpu_of_this_name_is_preferred():
    l4 = _entry(file="engines/l4.plan", gpu_name="NVIDIA L4", compute_capability="8.9")
    rtx = _entry(file="engines/rtx.plan", gpu_name="NVIDIA GeForce RTX 4090", compute_capability="8.9")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _select([l4, rtx], cc="8.9", name="NVIDIA GeForce RTX 4090") is rtx


def test_an_engine_matching_only_the_compute_capability_runs_with_a_warning():
    l4 = _entry(file="engines/l4.plan", gpu_name="NVIDIA L4", compute_capability="8.9")
    with pytest.warns(RuntimeWarning, match=r"engines/l4.plan was built on NVIDIA L4, not on this NVIDIA "
                                            r"GeForce RTX 4090 \(same compute capability 8.9\).*--engines on"):
        assert _select([l4], cc="8.9", name="NVIDIA GeForce RTX 4090") is l4


@pytest.mark.parametrize("what, kwargs", [
    ("its ONNX file differs", {"sha": "b" * 64}),
    ("its TensorRT version differs (built by 10.3.0, this is 11.4.0.106)", {"version": "11.4.0.106"}),
    ("its GPU differs (built for Orin, compute capability 8.7; this GPU has 9.0)", {"cc": "9.0"}),
])
def test_a_mismatching_engine_is_refused_naming_what_differs(what, kwargs):
    with pytest.raises(EngineBuildError) as info:
        _select([_entry()], **kwargs)
    message = str(info.value)
    assert what in message
    assert "lddm-export build --bundle /b --engines on" in message
    others = {"its ONNX file differs", "its TensorRT version differs", "its GPU differs"} - {what.split(" (")[0]}
    assert not any(o in message for o in others), message


def test_every_difference_is_named_at_once():
    with pytest.raises(EngineBuildError, match="ONNX file differs.*TensorRT version differs.*GPU differs"):
        _select([_entry()], sha="b" * 64, version="11.0.0.114", cc="9.0")


def test_a_missing_engine_is_refused_with_the_build_command():
    with pytest.raises(EngineBuildError, match=r"no fp32 TensorRT engine for graph 'denoiser'.*--engines on"):
        _select([_entry()], precision="fp32")


def test_the_engine_build_path_imports_neither_torch_nor_training():
    code = ("import sys, lddm_export.engines, runtimes.cuda_util; "
            "bad = [m for m in ('torch', 'training', 'onnxruntime') if m in sys.modules]; "
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr


def test_engines_on_without_tensorrt_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)          # `import tensorrt` now fails
    assert not tensorrt_available()
    root = make_bundle(tmp_path / "b")
    with pytest.raises(BackendUnavailable) as info:
        build_engines(root, json.loads((root / "manifest.json").read_text()), ["fp16"], PROFILE)
    message = str(info.value)
    assert "pip install tensorrt" in message and "JetPack" in message and "--engines off" in message
    assert not (root / "engines").exists()


def test_cli_engines_on_without_tensorrt_fails_cleanly(tmp_path, monkeypatch, capsys):
    from lddm_export.cli import main
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    root = make_bundle(tmp_path / "b")
    before = (root / "manifest.json").read_bytes()
    with pytest.raises(SystemExit) as info:
        main(["build", "--bundle", str(root), "--engines", "on", "--precision", "fp16", "--batch", "1,2,4"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "pip install tensorrt" in err and "--engines off" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]               # no temporary bundle left
    assert sorted(p.name for p in root.iterdir()) == ["manifest.json", "onnx"]
    assert (root / "manifest.json").read_bytes() == before


@pytest.mark.parametrize("args, message", [
    ({"profile": {"min": 4, "opt": 2, "max": 8}}, r"1 <= min <= opt <= max"),
    ({"profile": {"min": 0, "opt": 2, "max": 8}}, r"1 <= min <= opt <= max"),
    ({"workspace_mb": 0}, r"workspace cap must be a positive number of MiB, got 0"),
    ({"precisions": ["fp16"], "remove": "onnx/denoiser.fp16.onnx"}, r"no fp16 ONNX graph for 'denoiser'"),
])
def test_bad_build_requests_are_refused_before_tensorrt_is_needed(tmp_path, monkeypatch, args, message):
    monkeypatch.setitem(sys.modules, "tensorrt", None)          # the request is checked first
    root = make_bundle(tmp_path / "b")
    if "remove" in args:
        (root / args.pop("remove")).unlink()
    manifest = json.loads((root / "manifest.json").read_text())
    call = {"precisions": ["fp32", "fp16"], "profile": PROFILE, **args}
    with pytest.raises(EngineBuildError, match=message):
        build_engines(root, manifest, call["precisions"], call["profile"], call.get("workspace_mb"))


def test_the_trt_runner_without_tensorrt_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    runner = TrtRunner(Bundle.open(make_bundle(tmp_path / "b"), check_hashes=False), "denoiser", "fp16")
    with pytest.raises(BackendUnavailable, match="pip install tensorrt.*--backend ort"):
        runner.activate()
    assert not runner.is_active


def test_gpu_identity_without_a_driver_is_a_clear_error():
    try:
        import ctypes
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        with pytest.raises(BackendUnavailable, match=r"libcuda\.so\.1.*--engines off"):
            gpu_identity()
    else:
        pytest.skip("this machine has a CUDA driver; test_gpu_identity_agrees_with_torch covers it")


@pytest.mark.gpu
def test_gpu_identity_agrees_with_torch():
    gpu = gpu_identity(0)
    assert gpu.compute_capability == "%d.%d" % torch.cuda.get_device_capability(0)
    assert gpu.name == torch.cuda.get_device_name(0)


def test_the_tiny_graphs_agree_in_onnxruntime(tmp_path):
    """The reference the engine tests compare with: fp16 within 1e-2 of fp32, probabilities sum to 1."""
    root = make_bundle(tmp_path / "b")
    inputs = feed(3)
    fp32, fp16 = ort_reference(root, "fp32", inputs), ort_reference(root, "fp16", inputs)
    assert fp32.shape == (3, L, V)
    np.testing.assert_allclose(np.exp(fp32).sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(fp16, fp32, atol=1e-2)


# --- where TensorRT and a GPU exist: real engines

def needs_tensorrt(test):
    """Markers trt and gpu; the skip reason names tensorrt first, as it is the rarer of the two."""
    test = pytest.mark.gpu(pytest.mark.trt(test))
    return pytest.mark.skipif(not tensorrt_available(), reason="tensorrt is not installed")(test)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny bundle with fp32 and fp16 engines, and the timing cache file the build wrote."""
    root = make_bundle(tmp_path_factory.mktemp("trt") / "bundle")
    cache = root.parent / "timing.cache"
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["engines"] = build_engines(root, manifest, ["fp32", "fp16"], PROFILE, workspace_mb=256,
                                        log=lambda line: None, timing_cache=cache)
    write_manifest(root, manifest)
    return root, cache


def ort_reference(root: Path, precision: str, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    import onnxruntime as ort
    session = ort.InferenceSession(str(root / f"onnx/denoiser.{precision}.onnx"), providers=["CPUExecutionProvider"])
    return session.run(["log_probs"], {k: v.numpy() for k, v in inputs.items()})[0]


@needs_tensorrt
def test_build_records_engines_as_the_manifest_says(built):
    import tensorrt as trt
    root, cache = built
    entries = json.loads((root / "manifest.json").read_text())["engines"]
    gpu = gpu_identity()
    assert [(e["graph"], e["precision"]) for e in entries] == [(g, p) for g in ("denoiser", "trunk", "head")
                                                               for p in ("fp32", "fp16")]
    for e in entries:
        assert e["file"] == engine_file_name(e["graph"], e["precision"], gpu, trt.__version__)
        assert (root / e["file"]).stat().st_size > 0
        assert e["trt_version"] == trt.__version__ and e["compute_capability"] == gpu.compute_capability
        assert e["profile"] == PROFILE and e["onnx_file"] == f"onnx/{e['graph']}.{e['precision']}.onnx"
    assert cache.stat().st_size > 0


@needs_tensorrt
@pytest.mark.parametrize("precision, atol", [("fp32", 1e-5), ("fp16", 2e-2)])
@pytest.mark.parametrize("use_cuda_graph", [False, True])
def test_engine_matches_onnxruntime(built, precision, atol, use_cuda_graph):
    root, _ = built
    bundle = Bundle.open(root, check_hashes=False)
    with TrtRunner(bundle, "denoiser", precision, use_cuda_graph=use_cuda_graph) as runner:
        for batch, seed in [(1, 0), (3, 1), (1, 2), (4, 3)]:      # batch 1 again: its graph is replayed
            inputs = feed(batch, seed)
            got = runner.infer({k: v.cuda() for k, v in inputs.items()})["log_probs"]
            assert got.device.type == "cuda" and got.dtype == torch.float32
            want = ort_reference(root, precision, inputs)
            np.testing.assert_allclose(got.cpu().numpy(), want, atol=atol, rtol=0)


@needs_tensorrt
def test_fp32_engines_compute_in_fp32_not_tf32(tmp_path):
    """Two 1024-wide MatMuls: in TF32 (10-bit mantissas) they would be off by about 1e-3."""
    root = make_bundle(tmp_path / "b", hidden=1024)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["engines"] = build_engines(root, manifest, ["fp32"], PROFILE, log=lambda line: None,
                                        timing_cache=tmp_path / "timing.cache")
    write_manifest(root, manifest)
    inputs = feed(4)
    with TrtRunner(Bundle.open(root), "denoiser", "fp32", use_cuda_graph=False) as runner:
        got = runner.infer({k: v.cuda() for k, v in inputs.items()})["log_probs"].cpu().numpy()
    np.testing.assert_allclose(got, ort_reference(root, "fp32", inputs), atol=1e-4, rtol=0)


@needs_tensorrt
def test_persistent_outputs_alias_and_clones_do_not(built):
    root, _ = built
    bundle = Bundle.open(root, check_hashes=False)
    with TrtRunner(bundle, "denoiser", "fp32", clone_outputs=False) as runner:
        first = runner.infer({k: v.cuda() for k, v in feed(2, 0).items()})["log_probs"]
        kept = first.clone()
        second = runner.infer({k: v.cuda() for k, v in feed(2, 1).items()})["log_probs"]
        assert first.data_ptr() == second.data_ptr() and not torch.equal(first, kept)
    with TrtRunner(bundle, "denoiser", "fp32") as runner:
        first = runner.infer({k: v.cuda() for k, v in feed(2, 0).items()})["log_probs"]
        second = runner.infer({k: v.cuda() for k, v in feed(2, 1).items()})["log_probs"]
        assert first.data_ptr() != second.data_ptr()


@needs_tensorrt
def test_batch_above_the_profile_is_refused(built):
    bundle = Bundle.open(built[0], check_hashes=False)
    with TrtRunner(bundle, "denoiser", "fp16") as runner:
        with pytest.raises(ShapeMismatch, match="above the engine profile's maximum 4"):
            runner.infer({k: v.cuda() for k, v in feed(5).items()})


@needs_tensorrt
@pytest.mark.parametrize("change, what", [
    (lambda e, root: e.update(trt_version="9.9.9"), "TensorRT version differs"),
    (lambda e, root: e.update(compute_capability="1.0"), "GPU differs"),
    (lambda e, root: onnx.save(tiny_graph("denoiser", fp16=False), str(root / e["onnx_file"])), "ONNX file differs"),
])
def test_a_stale_engine_is_refused_before_deserialising(built, tmp_path, change, what):
    import shutil
    root = Path(shutil.copytree(built[0], tmp_path / "bundle"))
    manifest = json.loads((root / "manifest.json").read_text())
    fp16 = next(e for e in manifest["engines"] if e["precision"] == "fp16")
    change(fp16, root)
    (root / "manifest.json").write_text(json.dumps(manifest))
    runner = TrtRunner(Bundle.open(root, check_hashes=False), "denoiser", "fp16")
    with pytest.raises(EngineBuildError, match=what + ".*--engines on"):
        runner.activate()


@needs_tensorrt
def test_an_unparsable_graph_lists_the_parser_errors(tmp_path):
    root = make_bundle(tmp_path / "b")
    model = tiny_graph("denoiser", fp16=False)
    model.graph.node[-1].op_type = "NoSuchOp"
    onnx.save(model, str(root / "onnx/denoiser.fp32.onnx"))
    manifest = json.loads((root / "manifest.json").read_text())
    with pytest.raises(EngineBuildError, match="could not parse .*denoiser.fp32.onnx: .*NoSuchOp"):
        build_engines(root, manifest, ["fp32"], PROFILE, log=lambda line: None, timing_cache=tmp_path / "c")
