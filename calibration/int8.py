"""INT8 graphs by explicit quantisation (QuantizeLinear/DequantizeLinear pairs), calibrated on
the bundle's own sampling trajectories.

The quantiser is onnxruntime.quantization's static quantiser, in its QDQ format, with symmetric
int8 activations (one scale per tensor, zero point 0) and symmetric int8 weights (one scale per
output channel). That form is the one both consumers accept: ONNX Runtime's CPU provider fuses
Q/DQ around MatMul into its int8 kernels (VNNI where the CPU has it), and TensorRT's explicit
quantisation takes int8 Q/DQ with zero points of 0 and per-channel weight scales on the output
axis, which a strongly typed network builds as written. NVIDIA ModelOpt's ONNX PTQ writes the
same form; it is not used because it adds CUDA-side dependencies (cupy, its own onnxruntime-gpu
pins) that the CPU build machine and the Jetson image do not need. TensorRT 11 has no implicit
INT8 calibration, so the precision decisions live in the graph either way.

Quantised: every MatMul and Gemm with a constant weight (the linear layers: nearly all FLOPs).
Kept FP32:
  - every other node (norms, softmax and log-softmax, the time embedding, attention's two
    activation-by-activation MatMuls), as in the FP16 graph's rule islands;
  - the linear layers that FP16 calibration kept in FP32 (its calibrated islands);
  - the linear layers whose input has an outlier step along the trajectories: its largest |x| at
    some recorded step is more than OUTLIER_RATIO times the median step's (one scale per tensor
    cannot resolve both ranges: calibrated to the outlier it would flatten every other step, and
    calibrated to the rest it would clip that step).
Activation ranges: the CALIB_PERCENTILE-th percentile of |x| over every recorded feed.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_static)

from calibration.fp16_islands import IslandDecision
from calibration.stats import activation_stats
from runtimes.errors import LddmError

QUANTISED_OPS = ("MatMul", "Gemm")
OUTLIER_RATIO = 16.0
CALIB_PERCENTILE = 99.999


def linear_layers(model: onnx.ModelProto) -> dict[str, str]:
    """MatMul/Gemm nodes with a constant weight -> the name of their activation input."""
    constants = {init.name for init in model.graph.initializer}
    constants |= {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    return {node.name: node.input[0] for node in model.graph.node
            if node.op_type in QUANTISED_OPS and node.input[1] in constants and node.input[0] not in constants}


def outlier_layers(model: onnx.ModelProto, feeds: list[dict], ratio: float = OUTLIER_RATIO) -> list[IslandDecision]:
    """The linear layers whose input's largest |x| at some recorded step is more than `ratio`
    times the median step's: they stay FP32 in the INT8 graph.

    Args:
        model: the FP32 ONNX graph; feeds: its recorded feeds (calibration.trajectories).
    """
    layers = linear_layers(model)
    producers = {out: node.name for node in model.graph.node for out in node.output}
    graph_inputs = {i.name for i in model.graph.input}
    measured = {producers[x] for x in layers.values() if x in producers}
    stats = activation_stats(model, feeds, nodes=measured) if measured else {}
    ops = {node.name: node.op_type for node in model.graph.node}
    decisions = []
    for node, x in layers.items():
        if x in graph_inputs or x not in stats:
            continue
        steps = stats[x].feed_absmax
        typical = float(np.median(steps))
        if typical > 0 and max(steps) > ratio * typical:
            decisions.append(IslandDecision(node, ops[node], f"outlier input: absmax {max(steps):.3g} at step "
                                                            f"{int(np.argmax(steps))} > {ratio:g} x the median "
                                                            f"step's {typical:.3g}"))
    return decisions


class _Feeds(CalibrationDataReader):
    """The quantiser's calibration data: the recorded feeds as one batch (numpy), concatenated
    along the dynamic axis, since the quantiser's calibrator stacks what it collects per feed and
    the head's row counts differ from step to step."""

    def __init__(self, feeds: list[dict]):
        self._feeds = iter([{name: np.concatenate([f[name].numpy() for f in feeds]) for name in feeds[0]}])

    def get_next(self) -> dict | None:
        feed = next(self._feeds, None)
        return feed


def quantize_int8(model: onnx.ModelProto, feeds: list[dict], keep_fp32: Iterable[str] = (),
                  method: str = "percentile") -> onnx.ModelProto:
    """The Q/DQ INT8 graph of an FP32 graph.

    Args:
        model: the FP32 ONNX graph (a bundle's, opset >= 13).
        feeds: its feeds recorded along sampling trajectories (calibration.trajectories.record_feeds).
        keep_fp32: names of linear layers to leave unquantised (outlier_layers, FP16 islands).
    Returns:
        the INT8 graph: the same inputs and outputs, float32 at its edges.
    Raises:
        LddmError: no feeds, or the quantiser failed (the message names why).
    """
    if not feeds:
        raise LddmError("INT8 quantisation needs recorded feeds of the graph; none were given")
    reader = _Feeds(feeds)
    layers = linear_layers(model)
    keep = set(keep_fp32)
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)  # the quantiser logs a pre-processing hint per call
    try:
        with tempfile.TemporaryDirectory(prefix="lddm-int8-") as tmp:
            source, out = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
            onnx.save_model(model, str(source))   # a path: the quantiser's copies keep their weights beside it
            quantize_static(source, out, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            nodes_to_quantize=[n for n in layers if n not in keep],
                            op_types_to_quantize=list(QUANTISED_OPS),
                            calibrate_method={"percentile": CalibrationMethod.Percentile,
                                              "minmax": CalibrationMethod.MinMax}[method],
                            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                           "MatMulConstBOnly": True, "CalibPercentile": CALIB_PERCENTILE})
            quantised = onnx.load(str(out))
    except (ValueError, RuntimeError, onnx.checker.ValidationError) as e:
        raise LddmError(f"onnxruntime's quantiser failed on graph {model.graph.name!r} ({str(e)[:200]}); "
                        f"build without int8") from None
    finally:
        logger.setLevel(level)
    return quantised


def quantised_layers(model: onnx.ModelProto) -> int:
    """The number of int8 weight DequantizeLinear nodes: the linear layers the graph runs in INT8."""
    inits = {i.name: i for i in model.graph.initializer}
    return sum(1 for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
               and inits[n.input[0]].data_type == onnx.TensorProto.INT8)
