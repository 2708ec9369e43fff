"""Activation statistics of every intermediate tensor of an ONNX graph over recorded feeds.

Every float tensor that a node produces is made a graph output, the graph is run in ONNX
Runtime (CPU, FP32) on each feed, and per tensor we accumulate: the largest magnitude, the
RMS, and a histogram of log2|x|. The histogram answers both questions asked of it:
  - FP16: how close a tensor comes to 65504 (overflow) and how much of it falls below 2^-24
    (flushes to zero) -- calibration/fp16_islands.py;
  - INT8: whether one step's range is far beyond the others' (per-feed maxima) -- calibration/int8.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import torch

LOG2_BINS = np.arange(-40, 21)  # |x| histogram edges: 2^-40 .. 2^20; zeros are counted apart


@dataclass
class TensorStats:
    """Running statistics of one tensor.

    Attributes:
        node: the name of the node producing it; op_type: that node's op.
        absmax: largest |x| seen; sum_sq, count: for the RMS; zeros: exact zeros seen.
        hist: counts of log2|x| in LOG2_BINS (nonzero finite values; below/above go to the ends).
        nonfinite: NaN or Inf values seen (any > 0 is a bug in the FP32 graph).
        feed_absmax: the largest |x| of each feed (update call), in order: one per recorded
            step, so a range that only one t reaches stands out.
    """

    node: str
    op_type: str
    absmax: float = 0.0
    sum_sq: float = 0.0
    count: int = 0
    zeros: int = 0
    nonfinite: int = 0
    hist: np.ndarray = field(default_factory=lambda: np.zeros(len(LOG2_BINS) - 1, dtype=np.int64))
    feed_absmax: list[float] = field(default_factory=list)

    def update(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float64).ravel()
        finite = np.isfinite(x)
        self.nonfinite += int((~finite).sum())
        x = np.abs(x[finite])
        self.feed_absmax.append(float(x.max()) if x.size else 0.0)
        if not x.size:
            return
        self.absmax = max(self.absmax, float(x.max()))
        self.sum_sq += float(np.dot(x, x))
        self.count += x.size
        nonzero = x[x > 0]
        self.zeros += x.size - nonzero.size
        # bin i holds 2^(LOG2_BINS[i]) <= |x| < 2^(LOG2_BINS[i + 1]); bincount is a histogram
        # over integer exponents without np.histogram's sort
        exponent = np.clip(np.floor(np.log2(nonzero)).astype(np.int64), LOG2_BINS[0], LOG2_BINS[-2])
        self.hist += np.bincount(exponent - LOG2_BINS[0], minlength=len(self.hist))

    @property
    def rms(self) -> float:
        return (self.sum_sq / self.count) ** 0.5 if self.count else 0.0

    def fraction_below(self, threshold: float) -> float:
        """Fraction of nonzero values with |x| < threshold (resolution: one power of two)."""
        total = self.hist.sum()
        if not total:
            return 0.0
        return float(self.hist[LOG2_BINS[1:] <= np.log2(threshold)].sum() / total)

    def percentile(self, q: float) -> float:
        """An upper bound on the q-th percentile of |x| (q in [0, 100]), from the histogram."""
        total = self.hist.sum()
        if not total:
            return 0.0
        index = int(np.searchsorted(np.cumsum(self.hist), q / 100.0 * total))
        return min(float(2.0 ** LOG2_BINS[min(index + 1, len(LOG2_BINS) - 1)]), self.absmax)


def _float_node_outputs(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Every float32 tensor produced by a node (by shape inference) -> its producing node."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    return {out: node for node in model.graph.node for out in node.output
            if out and types.get(out) == onnx.TensorProto.FLOAT}


def activation_stats(model: onnx.ModelProto, feeds: list[dict[str, torch.Tensor]],
                     threads: int | None = None, nodes: set[str] | None = None,
                     on_feed: Callable[[], None] | None = None) -> dict[str, TensorStats]:
    """Run an FP32 graph on recorded feeds and gather statistics of every float tensor.

    Args:
        model: the FP32 ONNX graph (graph inputs float32/int64).
        feeds: feeds recorded by calibration.trajectories.record_feeds for this graph.
        threads: ONNX Runtime intra-op threads, or None for its default.
        nodes: only the outputs of these nodes (by name); None for every node.
        on_feed: called after each feed is measured (progress), or None.
    Returns:
        tensor name -> TensorStats, for every float32 tensor produced by a (selected) node.
    """
    import onnxruntime as ort

    produced = {name: node for name, node in _float_node_outputs(model).items()
                if nodes is None or node.name in nodes}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
                              for name in produced if name not in existing)
    options = ort.SessionOptions()
    # Optimisations would fuse nodes away and the probed tensors with them.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    stats = {name: TensorStats(node.name, node.op_type) for name, node in produced.items()}
    for feed in feeds:
        values = session.run(names, {k: v.numpy() for k, v in feed.items()})
        for name, value in zip(names, values):
            if name in stats:
                stats[name].update(value)
        if on_feed is not None:
            on_feed()
    return stats
