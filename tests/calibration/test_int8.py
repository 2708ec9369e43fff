"""INT8 Q/DQ graphs: what is quantised, the outlier catch, parity on a bundle, the commands."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from calibration.int8 import OUTLIER_RATIO, linear_layers, outlier_layers, quantised_layers, quantize_int8
from fixtures import tiny_checkpoint
from lddm_export.build import build_bundle, parse_options
from lddm_export.verify import VerifyOptions, verify_bundle
from runtimes.backends import make_runners
from runtimes.bundle import Bundle
from runtimes.errors import BackendUnavailable, LddmError
from runtimes.tolerances import INT8_REL_L2

K = 32
TIMES = np.linspace(1.0, 1 / 16, 16, dtype=np.float32)


def planted_outlier_graph() -> onnx.ModelProto:
    """out = x @ W0 + h @ W1 with h = x * (1 + 1000 relu(t - 0.95)): at t = 1 (the all-masked
    first step of a chain) h is 51x its range at every other t; x is the same at every t."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((K, K)) / K ** 0.5).astype(np.float32), name)
             for name in ("W0", "W1")]
    inits += [numpy_helper.from_array(np.array(v, np.float32), name)
              for name, v in (("threshold", 0.95), ("gain", 1000.0), ("one", 1.0))]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "axis"))
    nodes = [helper.make_node("Sub", ["t", "threshold"], ["dt"]), helper.make_node("Relu", ["dt"], ["r"]),
             helper.make_node("Mul", ["r", "gain"], ["g"]), helper.make_node("Add", ["g", "one"], ["scale"]),
             helper.make_node("Unsqueeze", ["scale", "axis"], ["scale2"]),
             helper.make_node("Mul", ["x", "scale2"], ["h"]),
             helper.make_node("MatMul", ["x", "W0"], ["a"], name="plain_layer"),
             helper.make_node("MatMul", ["h", "W1"], ["b"], name="outlier_layer"),
             helper.make_node("Add", ["a", "b"], ["out"])]
    graph = helper.make_graph(nodes, "planted", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", K]),
                                                 helper.make_tensor_value_info("t", TensorProto.FLOAT, ["B"])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["B", K])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


def trajectory_feeds(batch: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(batch, K, generator=g), "t": torch.full((batch,), float(t))} for t in TIMES]


def worst_rel_l2(fp32: onnx.ModelProto, int8: onnx.ModelProto, feeds) -> float:
    ref, got = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (fp32, int8))
    errors = []
    for feed in feeds:
        arrays = {k: v.numpy() for k, v in feed.items()}
        a, b = ref.run(None, arrays)[0], got.run(None, arrays)[0]
        assert np.isfinite(b).all()
        errors.append(float(np.linalg.norm(b - a) / np.linalg.norm(a)))
    return max(errors)


def test_a_planted_outlier_step_is_caught_and_kept_fp32():
    model, feeds = planted_outlier_graph(), trajectory_feeds()
    assert linear_layers(model) == {"plain_layer": "x", "outlier_layer": "h"}
    decisions = outlier_layers(model, feeds)
    assert [d.node for d in decisions] == ["outlier_layer"]
    assert "at step 0" in decisions[0].reason and f"> {OUTLIER_RATIO:g} x the median" in decisions[0].reason
    int8 = quantize_int8(model, feeds, [d.node for d in decisions])
    assert quantised_layers(int8) == 1   # plain_layer only
    assert 0 < worst_rel_l2(model, int8, feeds) <= INT8_REL_L2 / 5   # every step, the outlier step included
    # Without the catch one activation scale must span both ranges, and the other steps lose it.
    blind = quantize_int8(model, feeds)
    assert quantised_layers(blind) == 2 and worst_rel_l2(model, blind, feeds) > INT8_REL_L2


def test_quantize_refuses_no_feeds():
    with pytest.raises(LddmError, match="needs recorded feeds"):
        quantize_int8(planted_outlier_graph(), [])


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    ckpt = tiny_checkpoint(root / "model.pt", "seq")
    return build_bundle(ckpt, root / "bundle", parse_options("fp32,int8", engines="off"), log=lambda line: None), ckpt


def test_build_writes_int8_graphs_and_verify_gates_them(int8_bundle):
    root, ckpt = int8_bundle
    bundle = Bundle.open(root)
    for graph, entry in bundle.manifest["graphs"].items():
        assert set(entry["onnx"]) == {"fp32", "int8"} and entry["int8_fp32_nodes"] == []
        model = onnx.load(bundle.onnx_path(graph, "int8"))
        assert quantised_layers(model) == len(linear_layers(onnx.load(bundle.onnx_path(graph, "fp32")))) > 0
        assert {p.key: p.value for p in model.metadata_props}["lddm.precision"] == "int8"
    report = verify_bundle(root, ckpt, VerifyOptions(precisions=("int8",), distribution_samples=64, steps=4),
                           log=lambda line: None)
    assert report["passed"] and report["tolerances"]["int8_rel_l2"] == INT8_REL_L2
    log_probs = report["graphs"]["int8"]["token_denoiser"]["outputs"]["log_probs"]
    assert 0 < log_probs["rel_l2"] <= INT8_REL_L2   # quantised, and within the INT8 limit
    assert report["distribution"]["metrics"]["unigram_entropy"]["precisions"]["int8"]["margin"] == 0.10


def test_int8_runs_on_ort_and_is_refused_by_the_torch_backend(int8_bundle):
    bundle = Bundle.open(int8_bundle[0])
    runners = make_runners(bundle, "ort", "int8", "cpu", graphs=["head"])
    out = runners["head"].activate().infer({"hidden": torch.randn(5, bundle.shapes["W"])})["log_probs"]
    assert out.shape == (5, bundle.shapes["V"]) and torch.isfinite(out).all()
    with pytest.raises(BackendUnavailable, match="int8 is the bundle's quantised ONNX graph"):
        make_runners(bundle, "torch", "int8", "cpu")


def test_int8_without_calibration_is_refused():
    with pytest.raises(LddmError, match="--precision int8 is calibrated on the model's sampling trajectories"):
        parse_options("fp32,int8", calibrate=False)


def test_polygraphy_runs_a_graph_on_the_recorded_trajectory_feeds(int8_bundle, monkeypatch):
    import subprocess
    import sys
    from pathlib import Path

    from calibration import polygraphy_data

    root = int8_bundle[0]
    monkeypatch.delenv("LDDM_BUNDLE", raising=False)
    with pytest.raises(LddmError, match="set LDDM_BUNDLE=DIR and LDDM_GRAPH=NAME"):
        next(polygraphy_data.load_data())
    monkeypatch.setenv("LDDM_BUNDLE", str(root))
    monkeypatch.setenv("LDDM_GRAPH", "decoder")
    with pytest.raises(LddmError, match="LDDM_GRAPH='decoder' is not a graph of bundle"):
        next(polygraphy_data.load_data())
    monkeypatch.setenv("LDDM_GRAPH", "token_denoiser")
    feeds = list(polygraphy_data.load_data())
    assert feeds and set(feeds[0]) == {"x_t", "y0", "t"} and feeds[0]["x_t"].dtype == np.int64
    script = Path(polygraphy_data.__file__)
    polygraphy = Path(sys.executable).with_name("polygraphy")
    run = subprocess.run([str(polygraphy), "run", str(root / "onnx/token_denoiser.int8.onnx"), "--onnxrt",
                          "--data-loader-script", f"{script}:load_data"], capture_output=True, text=True,
                         timeout=300, cwd=script.parents[1])
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "PASSED" in run.stdout + run.stderr
