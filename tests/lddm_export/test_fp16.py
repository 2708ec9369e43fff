"""The mixed FP16 pass: parity with the torch modules in ONNX Runtime, and its island rules."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from fixtures import exported, parity_runs, session, tensor_types
from lddm_export.fp16 import fp16_out_of_range, to_mixed_fp16, to_mixed_fp16_with_report
from runtimes.compare import compare_outputs
from runtimes.errors import LddmError
from runtimes.tolerances import FP16_REL_L2, graph_tolerances

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16

# Written out (not derived from GRAPHS_BY_VARIANT): test_coverage.py checks that this list
# covers every exported (variant, graph) pair.
FP16_PARITY_CASES = [("mdlm", "denoiser"), ("fuji", "encoder"), ("fuji", "denoiser"),
                     ("seq", "encoder"), ("seq", "latent_denoiser"), ("seq", "token_denoiser"),
                     ("mdlm", "trunk"), ("fuji", "trunk"), ("seq", "trunk"),
                     ("mdlm", "head"), ("fuji", "head"), ("seq", "head")]


@pytest.mark.parametrize("variant,graph", FP16_PARITY_CASES)
def test_fp16_graph_matches_torch(variant, graph):
    g = exported(variant)[graph]
    sess = session(g["fp16"])
    tolerances = graph_tolerances("fp16", g["spec"].output_names)
    for label, feed, ref in parity_runs(g["module"], g["spec"], 6):
        outputs = sess.run(None, feed)
        assert [o.dtype for o in outputs] == [np.float32] * len(outputs)
        got = dict(zip(g["spec"].output_names, outputs))
        reports = compare_outputs(f"{variant}/{graph} fp16 ({label})", got, ref, tolerances)
        assert all(r.rel_l2 <= FP16_REL_L2 and r.nonfinite == 0 for r in reports.values())
        # FP16 really computed something: the graph is not a float32 graph in disguise.
        assert any(r.max_abs > 0 for r in reports.values())


@pytest.mark.parametrize("variant,graph", FP16_PARITY_CASES)
def test_edges_stay_float32_and_int64(variant, graph):
    g = exported(variant)[graph]
    for value, spec in zip([*g["fp16"].graph.input, *g["fp16"].graph.output], [*g["spec"].inputs, *g["spec"].outputs]):
        assert value.type.tensor_type.elem_type == (TensorProto.INT64 if spec.dtype == "int64" else FLOAT)
        assert value.type.tensor_type.shape.dim[0].dim_param == g["spec"].dynamic_axis


def _input_types(model: onnx.ModelProto, op_types: set[str] | None = None, names: set[str] | None = None):
    """op/name -> set of float dtypes the matching nodes read."""
    types = tensor_types(model)
    found = {}
    for node in model.graph.node:
        if (op_types and node.op_type in op_types) or (names and node.name in names):
            found.setdefault(node.op_type, set()).update(
                types[i] for i in node.input if i and types.get(i) in (FLOAT, HALF))
    return found


def test_islands_compute_in_fp32_and_matmuls_in_fp16():
    model = exported("fuji")["denoiser"]["fp16"]
    islands = _input_types(model, {"LayerNormalization", "Softmax", "LogSoftmax", "Sin", "Cos"})
    assert set(islands) == {"LayerNormalization", "Softmax", "LogSoftmax", "Sin", "Cos"}
    assert all(dtypes == {FLOAT} for dtypes in islands.values()), islands
    compute = _input_types(model, {"MatMul", "Gemm", "Gelu"})
    assert compute["MatMul"] == {HALF} and compute["Gemm"] == {HALF} and compute["Gelu"] == {HALF}


def test_rotary_and_time_embedding_arguments_stay_fp32():
    g = exported("mdlm")["denoiser"]
    report = g["report"]
    rotary = [n for n, why in report.fp32_nodes.items() if why == "module training.model.Rotary"]
    arguments = [n for n, why in report.fp32_nodes.items() if why == "argument of Sin/Cos"]
    assert len(rotary) >= 10  # q and k: 4 Mul, Sub, Add, Concat each
    assert {n.op_type for n in g["fp32"].graph.node if n.name in arguments} == {"Mul", "Unsqueeze"}
    types = tensor_types(g["fp16"])
    for node in g["fp16"].graph.node:
        if node.name in rotary or node.name in arguments:
            assert all(types[o] == FLOAT for o in node.output if types.get(o) in (FLOAT, HALF)), node.name


def test_weights_are_stored_in_fp16():
    model = exported("seq")["token_denoiser"]["fp16"]
    kinds = {t.name: t.data_type for t in model.graph.initializer}
    assert kinds["token_denoiser.embed.weight"] == HALF
    fp32_bytes = sum(t.ByteSize() for t in exported("seq")["token_denoiser"]["fp32"].graph.initializer)
    assert sum(t.ByteSize() for t in model.graph.initializer) < 0.75 * fp32_bytes


def test_keep_fp32_nodes_moves_a_matmul_into_fp32():
    g = exported("mdlm")["denoiser"]
    matmul = next(n.name for n in g["fp32"].graph.node if n.op_type == "MatMul")
    model, report = to_mixed_fp16_with_report(g["fp32"], keep_fp32_nodes=[matmul])
    assert report.fp32_nodes[matmul] == "keep_fp32_nodes"
    assert _input_types(model, names={matmul}) == {"MatMul": {FLOAT}}
    feed = next(parity_runs(g["module"], g["spec"], 6))[1]
    assert np.isfinite(session(model).run(None, feed)[0]).all()


def test_keep_fp32_nodes_refuses_unknown_names():
    with pytest.raises(LddmError, match=r"keep_fp32_nodes names \['no_such_node'\] that are not nodes"):
        to_mixed_fp16(exported("mdlm")["denoiser"]["fp32"], keep_fp32_nodes=["no_such_node"])


def _tiny_graph(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info(n, FLOAT, s) for n, s in outputs],
                              [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in initializers])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model, feed):
    return session(model).run(None, feed)[0]


def test_time_embedding_arguments_stay_fp32():
    # sin(1000 t f): in FP16, 1000 t near t = 1 is only good to 0.25, sin would be off by that much.
    model = _tiny_graph([helper.make_node("Mul", ["t", "k"], ["a"], name="scale"),
                         helper.make_node("Mul", ["a", "f"], ["b"], name="freq"),
                         helper.make_node("Sin", ["b"], ["s"], name="sin"),
                         helper.make_node("MatMul", ["s", "w"], ["y"], name="proj")],
                        [("t", [4, 1])], [("y", [4, 2])],
                        [("k", 1000.0), ("f", [[1.0, 0.7, 0.3]]), ("w", np.ones((3, 2)))])
    mixed, report = to_mixed_fp16_with_report(model)
    assert {n: report.fp32_nodes.get(n) for n in ("scale", "freq", "sin")} == {
        "scale": "argument of Sin/Cos", "freq": "argument of Sin/Cos", "sin": "op type Sin"}
    assert report.fp16_nodes == ["proj"]
    t = np.array([[0.999], [0.5], [0.123], [0.001]], np.float32)
    ref = np.sin(1000.0 * t * np.array([[1.0, 0.7, 0.3]])) @ np.ones((3, 2))
    np.testing.assert_allclose(_run(mixed, {"t": t}), ref, atol=5e-3)


def test_constants_outside_fp16_range_stay_fp32():
    model = _tiny_graph([helper.make_node("Mul", ["x", "big"], ["a"], name="scale_up"),
                         helper.make_node("Mul", ["a", "small"], ["b"], name="scale_down"),
                         helper.make_node("Add", ["b", "one"], ["y"], name="shift")],
                        [("x", [3])], [("y", [3])], [("big", 1e6), ("small", 1e-6), ("one", 1.0)])
    mixed, report = to_mixed_fp16_with_report(model)
    assert report.out_of_range == ["big", "small"]
    assert report.fp32_nodes == {"scale_up": "constant big outside the FP16 range",
                                 "scale_down": "constant small outside the FP16 range"}
    kinds = {t.name: t.data_type for t in mixed.graph.initializer}
    assert kinds == {"big": FLOAT, "small": FLOAT, "one": HALF}
    x = np.array([1.0, 2.0, -3.0], np.float32)
    got = _run(mixed, {"x": x})
    np.testing.assert_allclose(got, x + 1.0, rtol=2e-3)  # FP16 would give inf (1e6) or 1.3% off (1e-6)


def test_fp16_out_of_range_rule():
    assert fp16_out_of_range(np.array([70000.0])) and fp16_out_of_range(np.array([1e-6, 0.0]))
    assert not fp16_out_of_range(np.array([1e-6, 0.5]))  # a weight with one tiny entry
    assert not fp16_out_of_range(np.array([0.0, -65504.0])) and not fp16_out_of_range(np.array([np.inf]))


def test_a_constant_read_in_both_precisions_is_cast_once():
    model = _tiny_graph([helper.make_node("Softmax", ["c"], ["s"], name="soft", axis=-1),
                         helper.make_node("Add", ["x", "c"], ["a"], name="add16"),
                         helper.make_node("Mul", ["x", "c"], ["m"], name="mul16"),
                         helper.make_node("Add", ["a", "m"], ["y0"], name="sum16"),
                         helper.make_node("Add", ["y0", "s"], ["y"], name="out16")],
                        [("x", [2])], [("y", [2])], [("c", [0.5, 2.0])])
    mixed = to_mixed_fp16(model)
    assert {t.name: t.data_type for t in mixed.graph.initializer} == {"c": FLOAT}
    assert [n.output[0] for n in mixed.graph.node if n.op_type == "Cast" and n.input[0] == "c"] == ["c__to_fp16"]
    x, c = np.array([1.0, -1.0], np.float32), np.array([0.5, 2.0])
    expected = (x + c) + x * c + np.exp(c) / np.exp(c).sum()
    np.testing.assert_allclose(_run(mixed, {"x": x}), expected, rtol=2e-3)


def test_an_out_of_range_constant_node_keeps_its_readers_fp32():
    big = helper.make_node("Constant", [], ["big"], name="big_const",
                           value=numpy_helper.from_array(np.array(1e5, np.float32)))
    model = _tiny_graph([big, helper.make_node("Mul", ["x", "big"], ["a"], name="scale_up"),
                         helper.make_node("Div", ["a", "big"], ["y"], name="scale_down")],
                        [("x", [2])], [("y", [2])])
    mixed, report = to_mixed_fp16_with_report(model)
    assert set(report.fp32_nodes) == {"big_const", "scale_up", "scale_down"}
    x = np.array([3.0, -0.25], np.float32)
    np.testing.assert_allclose(_run(mixed, {"x": x}), x, rtol=1e-6)
