"""ONNX export: FP32 parity with the torch modules, the I/O contract, saving, the comparator."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from fixtures import OPSET, exported, parity_runs, random_model, session
from lddm_export import export
from runtimes.compare import compare_outputs, measure
from runtimes.errors import LddmError, ShapeMismatch, ToleranceExceeded
from runtimes.spec import graph_specs
from runtimes.tolerances import FP32_MAX_REL, OutputTolerance, graph_tolerances
from training.model import graph_modules

# Written out (not derived from GRAPHS_BY_VARIANT): test_coverage.py checks that this list
# covers every exported (variant, graph) pair.
FP32_PARITY_CASES = [("mdlm", "denoiser"), ("fuji", "encoder"), ("fuji", "denoiser"),
                     ("seq", "encoder"), ("seq", "latent_denoiser"), ("seq", "token_denoiser"),
                     ("mdlm", "trunk"), ("fuji", "trunk"), ("seq", "trunk"),
                     ("mdlm", "head"), ("fuji", "head"), ("seq", "head")]


def assert_fp32_parity(name: str, fp32: onnx.ModelProto, module: torch.nn.Module, spec, vocab: int) -> int:
    """The FP32 graph agrees with its torch module on every parity run; returns the run count."""
    sess = session(fp32)
    tolerances = graph_tolerances("fp32", spec.output_names)
    runs = 0
    for label, feed, ref in parity_runs(module, spec, vocab):
        got = dict(zip(spec.output_names, sess.run(None, feed)))
        reports = compare_outputs(f"{name} fp32 ({label})", got, ref, tolerances)
        assert all(r.max_rel <= FP32_MAX_REL and r.nonfinite == 0 for r in reports.values())
        runs += 1
    return runs


@pytest.mark.parametrize("variant,graph", FP32_PARITY_CASES)
def test_fp32_graph_matches_torch(variant, graph):
    g = exported(variant)[graph]
    runs = assert_fp32_parity(f"{variant}/{graph}", g["fp32"], g["module"], g["spec"], 6)
    assert runs == (3 if graph in ("encoder", "head") else 9)   # no t: one run per batch


@pytest.mark.parametrize("variant", ["fuji", "seq"])
def test_chunk_layout_graphs_match_torch(variant):
    # The chunk-pooling encoder (a reshape and a mean) and the denoisers' chunk-centred latent
    # positions (other rotary constants) export as faithfully as the slot layout.
    model = random_model(variant, n_latent=4, latent_layout="chunks")
    cfg = model.cfg
    specs = graph_specs(variant, cfg.seq_len, cfg.n_latent, cfg.latent_dim, cfg.total_vocab, cfg.width)
    for name, module in graph_modules(model).items():
        if name in ("trunk", "head"):   # the denoiser's own layers, without or after its latent path
            continue
        fp32 = export.export_graph(module, specs[name], cfg.total_vocab, OPSET)
        runs = assert_fp32_parity(f"{variant}/{name} chunks", fp32, module, specs[name], cfg.total_vocab)
        assert runs == (3 if name == "encoder" else 9)


@pytest.mark.parametrize("variant,graph", FP32_PARITY_CASES)
def test_batch_is_the_only_symbolic_dim(variant, graph):
    g = exported(variant)[graph]
    for value, spec in zip([*g["fp32"].graph.input, *g["fp32"].graph.output], [*g["spec"].inputs, *g["spec"].outputs]):
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param == ("N" if graph == "head" else "B") and not dims[0].HasField("dim_value")
        assert [d.dim_value for d in dims[1:]] == list(spec.shape[1:])
        assert all(not d.dim_param for d in dims[1:])


def test_graph_uses_layernorm_and_one_logsoftmax():
    ops = [n.op_type for n in exported("fuji")["denoiser"]["fp32"].graph.node]
    assert "LayerNormalization" in ops and ops.count("LogSoftmax") == 1
    assert g_opset(exported("fuji")["denoiser"]["fp32"]) == OPSET


@pytest.mark.parametrize("variant", ["mdlm", "fuji"])
def test_tanh_gelu_is_one_native_node(variant):
    """At the default opset the MLP's GELU(approximate="tanh") is one Gelu node per block (which
    ORT fuses and TensorRT maps to kGELU_TANH), not the Pow/Tanh/Mul/Add decomposition."""
    graph = exported(variant)["denoiser"]["fp32"].graph
    gelus = [n for n in graph.node if n.op_type == "Gelu"]
    approximations = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}.get("approximate")
                      for n in gelus]
    assert approximations and set(approximations) == {b"tanh"}
    assert not {"Tanh", "Pow"} & {n.op_type for n in graph.node}


def g_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def test_check_io_refuses_a_fixed_batch():
    g = exported("mdlm")["denoiser"]
    broken = onnx.ModelProto()
    broken.CopyFrom(g["fp32"])
    broken.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    with pytest.raises(ShapeMismatch, match=r"input 'x_t' of graph 'denoiser' has dims \[2, 16\], expected \['B', 16\]"):
        export.check_io(broken, g["spec"])


def test_check_io_refuses_a_wrong_dtype():
    g = exported("mdlm")["denoiser"]
    broken = onnx.ModelProto()
    broken.CopyFrom(g["fp32"])
    broken.graph.output[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    with pytest.raises(ShapeMismatch, match="output 'log_probs' .* FLOAT16, expected float32"):
        export.check_io(broken, g["spec"])


def test_exporter_failure_names_the_graph():
    class DataDependent(torch.nn.Module):
        def forward(self, x_t, t):
            if t.sum() > 0:  # Python control flow on a tensor: torch.export refuses it
                return x_t.float()
            return -x_t.float()

    spec = exported("mdlm")["denoiser"]["spec"]
    with pytest.raises(LddmError, match=f"exporting graph 'denoiser' to ONNX opset {OPSET} failed"):
        export.export_graph(DataDependent(), spec, 6, OPSET)


def test_save_checks_and_keeps_metadata(tmp_path):
    g = exported("seq")["latent_denoiser"]
    model = onnx.ModelProto()
    model.CopyFrom(g["fp32"])
    export.set_metadata(model, {"lddm.graph": "latent_denoiser", "lddm.config": {"seq_len": 16}})
    path = tmp_path / "g.onnx"
    assert export.save_onnx(model, path) == [path]
    props = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert props["lddm.graph"] == "latent_denoiser" and props["lddm.config"] == '{"seq_len": 16}'


def test_external_data_above_the_threshold(tmp_path, monkeypatch):
    g = exported("seq")["latent_denoiser"]
    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 1024)  # stands in for 2 GB
    path = tmp_path / "big.onnx"
    files = export.save_onnx(g["fp32"], path)
    assert files == [path, tmp_path / "big.onnx.data"]
    stored = onnx.load(path, load_external_data=False).graph.initializer
    big = [t for t in stored if np.prod(t.dims) * 4 > 1024]
    assert big and all(t.data_location == onnx.TensorProto.EXTERNAL for t in big)
    feed = next(parity_runs(g["module"], g["spec"], 6))[1]
    import onnxruntime as ort
    external = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)
    np.testing.assert_array_equal(external[0], session(g["fp32"]).run(None, feed)[0])
    assert all(not t.HasField("data_location") or t.data_location == onnx.TensorProto.DEFAULT
               for t in g["fp32"].graph.initializer)  # the model passed in is left as it was


def test_exported_model_keeps_module_namespaces():
    nodes = exported("mdlm")["denoiser"]["fp32"].graph.node
    namespaces = [p.value for n in nodes for p in n.metadata_props if p.key == "namespace"]
    assert any("training.model.Rotary" in ns for ns in namespaces)


# ----------------------------------------------------------------------------- comparator

def test_comparator_passes_and_reports_each_output():
    ref = {"y0_hat": np.ones((2, 3), np.float32), "log_probs": np.log(np.full((2, 4), 0.25, np.float32))}
    got = {"y0_hat": ref["y0_hat"] + 1e-6, "log_probs": ref["log_probs"]}
    reports = compare_outputs("g", got, ref, graph_tolerances("fp32", ["y0_hat", "log_probs"]))
    assert reports["y0_hat"].max_abs == pytest.approx(1e-6, rel=0.1) and reports["y0_hat"].passed
    assert reports["log_probs"].max_abs == 0.0


def test_comparator_raises_once_naming_graph_and_outputs():
    ref = {"a": np.ones(4, np.float32), "b": np.ones(4, np.float32), "c": np.ones(4, np.float32)}
    got = {"a": np.array([1, 1, np.nan, 1], np.float32), "b": ref["b"] * 1.01, "c": ref["c"]}
    with pytest.raises(ToleranceExceeded) as info:
        compare_outputs("denoiser (fp32, batch 4)", got, ref, graph_tolerances("fp32", ["a", "b", "c"]))
    message = str(info.value)
    assert "graph denoiser (fp32, batch 4)" in message and "a: 1 NaN/Inf values" in message
    assert "b: max_rel 0.01 > 0.0001" in message and "c:" not in message


def test_comparator_softmax_metrics_for_log_probs():
    ref = np.log(np.array([[0.7, 0.2, 0.1]]))
    got = np.log(np.array([[0.6, 0.3, 0.1]]))
    report = measure(got, ref, OutputTolerance(rel_l2=1e-2, kl=1e-3, on_softmax=True))
    p, q = np.array([0.7, 0.2, 0.1]), np.array([0.6, 0.3, 0.1])
    assert report.rel_l2 == pytest.approx(np.linalg.norm(q - p) / np.linalg.norm(p))
    assert report.kl == pytest.approx(np.sum(p * np.log(p / q)))
    assert [f.split()[0] for f in report.failures] == ["rel_l2", "kl"]


def test_comparator_missing_output():
    with pytest.raises(ToleranceExceeded, match=r"did not return the outputs \['y0_hat'\]"):
        compare_outputs("g", {}, {}, graph_tolerances("fp16", ["y0_hat"]))
