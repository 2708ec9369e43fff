"""INT8 by explicit quantisation: QuantizeLinear/DequantizeLinear pairs in the ONNX graph.

TensorRT 10 builds strongly typed networks and TensorRT 11 dropped implicit INT8 calibration,
so the INT8 precision decisions live in the graph as Q/DQ nodes, as for FP16: the graph is
what the engine computes, and ONNX Runtime (CPU) runs it here to measure the error.

Quantised: the inputs of every MatMul and Gemm.
  - weights (2-D initializers [K, N]): symmetric int8, one scale per output channel n:
    max_k |W[k, n]| / 127;
  - activations: symmetric int8, one scale per tensor: the `percentile`-th |x| over the
    recorded sampling trajectories / 127 (clipping the rare outliers costs less than the
    resolution a max-based scale would lose).
Everything else (norms, softmax, the heads' log-softmax) stays as in the FP32 graph.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from calibration.stats import TensorStats
from runtimes.errors import LddmError

QUANTISED_OPS = ("MatMul", "Gemm")


def _weight_scales(w: np.ndarray) -> np.ndarray:
    return np.maximum(np.abs(w).max(axis=0), 1e-12).astype(np.float32) / 127.0


def quantize_int8(model: onnx.ModelProto, stats: dict[str, TensorStats],
                  percentile: float = 99.99) -> tuple[onnx.ModelProto, dict[str, float]]:
    """Insert Q/DQ pairs in front of every MatMul/Gemm input of an FP32 graph.

    Args:
        model: the FP32 ONNX graph.
        stats: activation statistics of that graph over sampling trajectories
            (calibration.stats.activation_stats).
        percentile: which percentile of |x| sets an activation's clipping range.
    Returns:
        (the Q/DQ graph, activation tensor name -> the amax used).
    Raises:
        LddmError: a MatMul/Gemm activation input has no statistics (the stats are of
            another graph).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    initializers = {init.name: init for init in graph.initializer}
    graph_inputs = {i.name for i in graph.input}
    new_nodes, new_inits, amax_used, replaced = [], [], {}, {}

    def qdq(tensor: str, scale: np.ndarray, axis: int | None) -> str:
        if tensor in replaced:
            return replaced[tensor]
        base = f"{tensor}_int8"
        zero = np.zeros(scale.shape, dtype=np.int8)
        new_inits.extend([numpy_helper.from_array(scale, f"{base}_scale"),
                          numpy_helper.from_array(zero, f"{base}_zero")])
        kwargs = {} if axis is None else {"axis": axis}
        new_nodes.append(helper.make_node("QuantizeLinear", [tensor, f"{base}_scale", f"{base}_zero"],
                                          [f"{base}_q"], name=f"{base}_Q", **kwargs))
        new_nodes.append(helper.make_node("DequantizeLinear", [f"{base}_q", f"{base}_scale", f"{base}_zero"],
                                          [f"{base}_dq"], name=f"{base}_DQ", **kwargs))
        replaced[tensor] = f"{base}_dq"
        return replaced[tensor]

    for node in graph.node:
        if node.op_type not in QUANTISED_OPS:
            continue
        for i, tensor in enumerate(node.input[:2]):
            if tensor in initializers:
                w = numpy_helper.to_array(initializers[tensor])
                if w.ndim != 2 or w.dtype != np.float32:
                    continue
                if node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute):
                    w = w.T  # scales per output channel whatever the layout
                    node.input[i] = qdq(tensor, _weight_scales(w), axis=0)
                else:
                    node.input[i] = qdq(tensor, _weight_scales(w), axis=1 if i == 1 else None)
            elif tensor in graph_inputs:
                continue
            else:
                if tensor not in stats:
                    raise LddmError(f"MatMul input {tensor!r} has no activation statistics; "
                                    f"compute them on this same graph (calibration.stats.activation_stats)")
                amax = max(stats[tensor].percentile(percentile), 1e-8)
                amax_used[tensor] = amax
                node.input[i] = qdq(tensor, np.array(amax / 127.0, dtype=np.float32), axis=None)
    _insert_before_consumers(graph, new_nodes)
    graph.initializer.extend(new_inits)
    if out.opset_import[0].version < 13:
        raise LddmError(f"per-channel QuantizeLinear needs opset >= 13, the graph has "
                        f"{out.opset_import[0].version}; rebuild with --opset 17 or higher")
    onnx.checker.check_model(out)
    return out, amax_used


def _insert_before_consumers(graph: onnx.GraphProto, qdq_nodes: list[onnx.NodeProto]) -> None:
    """Place each Q/DQ pair right after its input's producer, keeping the node list topological."""
    producer_index = {out: i for i, node in enumerate(graph.node) for out in node.output}
    by_position: dict[int, list[onnx.NodeProto]] = {}
    for node in qdq_nodes:
        if node.op_type == "QuantizeLinear":
            position = producer_index.get(node.input[0], -1)
            by_position.setdefault(position, []).append(node)
        else:
            by_position[position].append(node)  # the DQ follows its Q
    nodes = list(by_position.get(-1, []))
    for i, node in enumerate(graph.node):
        nodes.append(node)
        nodes.extend(by_position.get(i, []))
    del graph.node[:]
    graph.node.extend(nodes)


def int8_dtype_check(model: onnx.ModelProto) -> int:
    """The number of QuantizeLinear nodes producing int8 (a sanity count for reports and tests)."""
    inits = {i.name: i for i in model.graph.initializer}
    return sum(1 for n in model.graph.node if n.op_type == "QuantizeLinear"
               and inits.get(n.input[2]) is not None and inits[n.input[2]].data_type == TensorProto.INT8)
