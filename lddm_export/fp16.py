"""The mixed-precision pass: an FP32 ONNX graph -> FP16 compute with FP32 islands.

TensorRT 10/11 build this graph strongly typed, so every tensor's dtype here is the dtype the
engine computes in; the graph is checked in ONNX Runtime on the CPU before any engine exists.
(onnxconverter-common's converter was seen to produce an invalid graph for an attention
block; this pass is small enough to reason about node by node.)

Which nodes stay FP32 (the islands), by rule:
  1. op types that lose range or accuracy in FP16: LayerNormalization and the other norms,
     Softmax, LogSoftmax, every Reduce*, Exp, Log, Pow, Sin, Cos (FP32_OP_TYPES);
  2. the arguments of Sin and Cos, back to the graph inputs: the time embedding is
     sin/cos(1000 t f), and 1000 t in FP16 is off by up to 0.25 rad;
  3. nodes the exporter attributes to a module in FP32_MODULES (node metadata "namespace"):
     the rotary embedding, which the PyTorch model itself computes in float32;
  4. nodes that read a constant outside the FP16 range: a value above 65504 (it would be
     inf), or a constant whose largest value is below 2**-14 (an epsilon or a tiny scale,
     which FP16 would flush to zero or keep only as a coarse subnormal); reported in
     MixedPrecisionReport.out_of_range. (Activations out of range cannot be seen in the
     graph: the calibration package measures them and passes keep_fp32_nodes.)
  5. op types not known to be FP16-safe (anything outside FP16_OP_TYPES): stay FP32;
  6. the names in keep_fp32_nodes (the calibration package picks them from activation
     statistics).
Everything else that computes on floats runs in FP16. A Cast is inserted wherever a tensor
crosses between an FP16 and an FP32 node (one per tensor and direction). Graph inputs and
outputs keep float32/int64, so every backend is fed the same arrays.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from calibration.fp16_islands import FP16_MAX, FP16_MIN_NORMAL
from runtimes.errors import LddmError

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16

FP32_OP_TYPES = frozenset({
    "LayerNormalization", "GroupNormalization", "InstanceNormalization", "BatchNormalization",
    "RMSNormalization", "Softmax", "LogSoftmax", "Exp", "Log", "Pow", "Sin", "Cos",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceMax", "ReduceMin", "ReduceProd", "CumSum",
})
FP16_OP_TYPES = frozenset({
    "MatMul", "Gemm", "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Sqrt", "Reciprocal", "Max", "Min",
    "Relu", "Sigmoid", "Tanh", "Gelu", "Erf", "Clip", "Where", "Concat", "Split", "Slice",
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Gather", "Expand", "Flatten", "Identity",
    "Tile", "Cast", "Constant", "ConstantOfShape", "Shape", "Size",
})
FP32_MODULES = ("training.model.Rotary",)
# Inputs of these ops take any dtype, so they never need a Cast in front.
ANY_DTYPE_INPUT_OPS = frozenset({"Shape", "Size", "Cast"})


@dataclass
class MixedPrecisionReport:
    """What the pass decided (for the build log and the tests).

    Attributes:
        fp32_nodes: node name -> the rule that kept it FP32.
        fp16_nodes: names of the nodes that compute in FP16.
        out_of_range: names of float constants kept FP32 because FP16 cannot hold them.
        casts: number of Cast nodes inserted.
    """

    fp32_nodes: dict[str, str] = field(default_factory=dict)
    fp16_nodes: list[str] = field(default_factory=list)
    out_of_range: list[str] = field(default_factory=list)
    casts: int = 0


def _module_of(node: onnx.NodeProto) -> str:
    return next((p.value for p in node.metadata_props if p.key == "namespace"), "")


def fp16_out_of_range(array: np.ndarray) -> bool:
    """True when FP16 cannot hold this constant: a value would overflow, or all of it is subnormal.

    A weight matrix with a few tiny entries is fine (they barely count in its sums); a constant
    that is tiny as a whole is an epsilon or a scale, and 1e-6 as an FP16 subnormal is 1.3% off.
    """
    finite = np.abs(array[np.isfinite(array)])
    if not finite.size:
        return False
    largest = float(finite.max())
    return largest > FP16_MAX or 0.0 < largest < FP16_MIN_NORMAL


class _Graph:
    """Index of one graph: element types, producers and consumers of every tensor."""

    def __init__(self, model: onnx.ModelProto):
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        g = inferred.graph
        self.types = {v.name: v.type.tensor_type.elem_type
                      for v in [*g.input, *g.output, *g.value_info]}
        self.types.update({t.name: t.data_type for t in g.initializer})
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.producer = {out: node for node in model.graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in model.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def is_float(self, name: str) -> bool:
        if name and name not in self.types:
            raise LddmError(f"the FP16 pass cannot tell the dtype of tensor {name!r} (shape inference "
                            f"left it untyped); re-export the graph or keep its producer in FP32")
        return bool(name) and self.types[name] == FLOAT

    def computes_on_floats(self, node: onnx.NodeProto) -> bool:
        return any(self.is_float(n) for n in [*node.input, *node.output])

    def float_constant(self, name: str) -> np.ndarray | None:
        """The value of a float32 initializer or Constant-node output, else None."""
        if name in self.initializers:
            tensor = self.initializers[name]
        elif name in self.producer and self.producer[name].op_type == "Constant":
            tensor = _constant_value(self.producer[name])
        else:
            return None
        return numpy_helper.to_array(tensor) if tensor is not None and tensor.data_type == FLOAT else None


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    return next((a.t for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR), None)


def _in_fp32_module(node: onnx.NodeProto) -> str | None:
    """The FP32_MODULES class this node was exported from, if any.

    The exporter's namespace reads "name: class/name: class/.../op: aten op", one segment per
    enclosing module.
    """
    classes = {segment.rsplit(": ", 1)[-1] for segment in _module_of(node).split("/")}
    return next((m for m in FP32_MODULES if m in classes), None)


def _out_of_range_constants(node: onnx.NodeProto, graph: _Graph) -> list[str]:
    """Names of the float constants this node reads, or holds as its value, that FP16 cannot hold."""
    names = [name for name in node.input
             if graph.float_constant(name) is not None and fp16_out_of_range(graph.float_constant(name))]
    value = _constant_value(node)
    if value is not None and value.data_type == FLOAT and fp16_out_of_range(numpy_helper.to_array(value)):
        names.append(node.name)
    return names


def _choose_fp32_nodes(model: onnx.ModelProto, graph: _Graph, keep_fp32_nodes: set[str],
                       report: MixedPrecisionReport) -> dict[str, str]:
    """Apply the rules of the module docstring; return FP32 node name -> the rule that chose it."""
    fp32: dict[str, str] = {}
    for node in model.graph.node:
        if not graph.computes_on_floats(node):
            continue
        constants = _out_of_range_constants(node, graph)
        report.out_of_range.extend(c for c in constants if c not in report.out_of_range)
        if node.name in keep_fp32_nodes:
            fp32[node.name] = "keep_fp32_nodes"
        elif node.op_type in FP32_OP_TYPES:
            fp32[node.name] = f"op type {node.op_type}"
        elif node.op_type not in FP16_OP_TYPES:
            fp32[node.name] = f"op type {node.op_type} not known to be FP16-safe"
        elif _in_fp32_module(node):
            fp32[node.name] = f"module {_in_fp32_module(node)}"
        elif constants:
            fp32[node.name] = f"constant {constants[0]} outside the FP16 range"
    # The arguments of Sin/Cos: walk back through the float tensors to the graph inputs.
    stack = [name for node in model.graph.node if node.op_type in ("Sin", "Cos") for name in node.input]
    visited: set[str] = set()
    while stack:
        producer = graph.producer.get(stack.pop())
        if producer is None or producer.name in visited:
            continue
        visited.add(producer.name)
        fp32.setdefault(producer.name, "argument of Sin/Cos")
        stack.extend(name for name in producer.input if graph.is_float(name))
    return fp32


def _to_half(tensor: onnx.TensorProto) -> onnx.TensorProto:
    return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name)


def _retype_constants(node: onnx.NodeProto) -> None:
    """Make an FP16 node's own float32 dtype attributes (Cast's `to`, a constant's value) FP16."""
    for attr in node.attribute:
        if node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
            attr.i = HALF
        elif attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == FLOAT:
            attr.t.CopyFrom(_to_half(attr.t))
    if node.op_type == "ConstantOfShape" and not any(a.name == "value" for a in node.attribute):
        node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.zeros(1, np.float16))))


def to_mixed_fp16_with_report(model: onnx.ModelProto, keep_fp32_nodes=()) -> tuple[onnx.ModelProto, MixedPrecisionReport]:
    """to_mixed_fp16, also returning what the pass decided (see MixedPrecisionReport)."""
    out, graph, precision, report = _plan(model, keep_fp32_nodes)
    dtype = _convert_initializers(out, graph, precision)
    report.casts = _insert_casts(out, graph, precision, dtype)
    return _checked(out, model.graph.name), report


def fp16_nodes_by_rule(model: onnx.ModelProto) -> list[str]:
    """The nodes the rules put in FP16 (no keep_fp32_nodes): the candidates of calibration."""
    *_, report = _plan(model, ())
    return report.fp16_nodes


def _plan(model: onnx.ModelProto, keep_fp32_nodes) -> tuple[onnx.ModelProto, _Graph, dict[str, int],
                                                              MixedPrecisionReport]:
    """Check the graph, copy it with every node named, and choose each float node's precision.

    Returns:
        (the copy, its index, node name -> FLOAT or HALF for every node computing on floats,
        the report with fp32_nodes, fp16_nodes and out_of_range filled in).
    """
    keep = set(keep_fp32_nodes)
    unknown = sorted(keep - {n.name for n in model.graph.node})
    if unknown:
        raise LddmError(f"keep_fp32_nodes names {unknown[:5]} that are not nodes of graph "
                        f"{model.graph.name!r}; pass node names of this FP32 ONNX graph")
    control_flow = [n.name for n in model.graph.node
                    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute)]
    if control_flow:
        raise LddmError(f"the FP16 pass does not handle control-flow nodes ({control_flow[:3]}); "
                        f"export graphs without If/Loop/Scan, as docs/design.md requires")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, node in enumerate(out.graph.node):  # the pass keys its decisions by node name
        node.name = node.name or f"{node.op_type}_{i}"
    graph = _Graph(out)
    report = MixedPrecisionReport()
    report.fp32_nodes = _choose_fp32_nodes(out, graph, keep, report)
    precision = {n.name: (FLOAT if n.name in report.fp32_nodes else HALF)
                 for n in out.graph.node if graph.computes_on_floats(n)}
    report.fp16_nodes = [name for name, p in precision.items() if p == HALF]
    return out, graph, precision, report


def _convert_initializers(out: onnx.ModelProto, graph: _Graph, precision: dict[str, int]) -> dict[str, int]:
    """Make FP16 the float initializers that only FP16 nodes read; return every float tensor's dtype.

    After the pass, graph inputs are float32, node outputs are in their node's precision, and an
    initializer is FP16 where every reader computes in FP16 (readers of any dtype not counted).
    """
    dtype = {v.name: FLOAT for v in out.graph.input if graph.is_float(v.name)}
    for node in out.graph.node:
        for name in node.output:
            if graph.is_float(name):
                dtype[name] = precision[node.name]
    for tensor in out.graph.initializer:
        if tensor.data_type != FLOAT:
            continue
        readers = [precision[n.name] for n in graph.consumers.get(tensor.name, []) if n.op_type not in ANY_DTYPE_INPUT_OPS]
        if readers and all(r == HALF for r in readers):
            tensor.CopyFrom(_to_half(tensor))
            dtype[tensor.name] = HALF
        else:
            dtype[tensor.name] = FLOAT
    return dtype


def _insert_casts(out: onnx.ModelProto, graph: _Graph, precision: dict[str, int], dtype: dict[str, int]) -> int:
    """Cast every float input whose dtype differs from its node's precision, retype FP16 nodes'
    own constants, and cast FP16 graph outputs back to float32; returns the Casts inserted."""
    # Float graph outputs computed in FP16 get an internal name and a final Cast to float32.
    renamed = {v.name: f"{v.name}__fp16" for v in out.graph.output
               if graph.is_float(v.name) and dtype.get(v.name) == HALF}

    nodes: list[onnx.NodeProto] = []
    casts: dict[tuple[str, int], str] = {}

    def cast(name: str, to: int) -> str:
        if (name, to) not in casts:
            suffix = "fp16" if to == HALF else "fp32"
            casts[name, to] = f"{name}__to_{suffix}"
            nodes.append(helper.make_node("Cast", [name], [casts[name, to]], to=to, name=f"{name}__cast_{suffix}"))
        return casts[name, to]

    for node in out.graph.node:
        want = precision.get(node.name)
        if want is not None and node.op_type not in ANY_DTYPE_INPUT_OPS:
            for i, name in enumerate(node.input):
                if graph.is_float(name) and dtype[name] != want:
                    node.input[i] = cast(renamed.get(name, name), want)
        node.input[:] = [renamed.get(n, n) for n in node.input]
        node.output[:] = [renamed.get(n, n) for n in node.output]
        if want == HALF:
            _retype_constants(node)
        nodes.append(node)
    for original, internal in renamed.items():
        nodes.append(helper.make_node("Cast", [internal], [original], to=FLOAT, name=f"{original}__cast_fp32"))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return len(casts) + len(renamed)


def _checked(out: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """The rewritten graph with fresh shape inference, refused unless the ONNX checker accepts it."""
    del out.graph.value_info[:]
    try:
        out = onnx.shape_inference.infer_shapes(out, strict_mode=True)
        onnx.checker.check_model(out)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise LddmError(f"the FP16 pass produced an invalid graph for {name!r} "
                        f"({str(e).strip().splitlines()[0][:200]}); this is a bug in lddm_export.fp16, "
                        f"please report it; --precision fp32 avoids it") from None
    return out


def to_mixed_fp16(model: onnx.ModelProto, keep_fp32_nodes=()) -> onnx.ModelProto:
    """Convert an FP32 graph to FP16 compute with FP32 islands (rules in the module docstring).

    Args:
        model: an FP32 ONNX model (as lddm_export.export writes); not modified.
        keep_fp32_nodes: names of extra nodes to keep in FP32 (e.g. from calibration).
    Returns:
        a new model: FP16 weights and activations outside the islands, Casts at island edges,
        the same float32/int64 inputs and outputs as `model`.
    Raises:
        LddmError: a name in keep_fp32_nodes is not a node of the graph, the graph has
            control flow, or a float tensor has no inferable dtype.
    """
    return to_mixed_fp16_with_report(model, keep_fp32_nodes)[0]
