"""Choose the FP16 graph's extra FP32 islands from activation statistics.

The FP16 pass (lddm_export/fp16.py) keeps FP32 by rule the ops known to need it (norms,
softmax, reductions, exp/log, the time embedding). Calibration adds the nodes whose outputs,
over whole sampling trajectories, would not survive FP16:
  - overflow: |x| * headroom > 65504, with headroom 8 by default (a later step with other
    inputs may go higher than any recorded one);
  - underflow: more than `max_flushed` of the nonzero values below 2^-24, which FP16 flushes
    to zero (values between 2^-24 and 2^-14 are subnormal: kept, with fewer bits);
  - NaN or Inf in the FP32 graph itself: an error, not an island.
Only the nodes the pass's rules would compute in FP16 are candidates. Calibration does not
import the pass (the layers of docs/design.md): its caller, lddm_export.build, passes that rule in.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import onnx

from calibration.stats import TensorStats, activation_stats
from runtimes.errors import ToleranceExceeded
from runtimes.progress import progress

# FP16's range (IEEE binary16), shared with the FP16 pass's check of constants.
FP16_MAX = 65504.0
FP16_MIN_NORMAL = 2.0 ** -14
FP16_MIN_SUBNORMAL = 2.0 ** -24

# An FP32 ONNX graph -> the names of the nodes the FP16 pass's rules compute in FP16
# (lddm_export.fp16.fp16_nodes_by_rule): calibration's candidates.
Fp16Rule = Callable[[onnx.ModelProto], Iterable[str]]


@dataclass(frozen=True)
class IslandDecision:
    node: str
    op_type: str
    reason: str     # "overflow: absmax 1.2e+04 x headroom 8 > 65504" or "underflow: ..."


def choose_fp32_islands(stats: dict[str, TensorStats], headroom: float = 8.0,
                        max_flushed: float = 0.01) -> list[IslandDecision]:
    """The nodes to keep in FP32, with the reason for each.

    Args:
        stats: tensor -> TensorStats (calibration.stats.activation_stats).
        headroom: required factor between the largest recorded |x| and FP16's 65504.
        max_flushed: largest tolerated fraction of nonzero values that FP16 flushes to zero.
    Returns:
        one IslandDecision per node (a node is listed once even if several outputs qualify).
    Raises:
        ToleranceExceeded: the FP32 graph itself produced NaN or Inf.
    """
    broken = [f"{name} ({s.op_type})" for name, s in stats.items() if s.nonfinite]
    if broken:
        raise ToleranceExceeded(f"the FP32 graph produced NaN/Inf along the sampling trajectories in "
                                f"{broken[:3]}; fix the checkpoint or the export before choosing FP16 islands")
    decisions: dict[str, IslandDecision] = {}
    for s in stats.values():
        if s.node in decisions:
            continue
        if s.absmax * headroom > FP16_MAX:
            decisions[s.node] = IslandDecision(
                s.node, s.op_type, f"overflow: absmax {s.absmax:.3g} x headroom {headroom:g} > {FP16_MAX:g}")
        elif s.fraction_below(FP16_MIN_SUBNORMAL) > max_flushed:
            decisions[s.node] = IslandDecision(
                s.node, s.op_type,
                f"underflow: {s.fraction_below(FP16_MIN_SUBNORMAL):.1%} of nonzero values below 2^-24")
    return list(decisions.values())


def calibrate_fp16_islands(models: dict[str, onnx.ModelProto], feeds: dict[str, list], fp16_rule: Fp16Rule,
                           headroom: float = 8.0, max_flushed: float = 0.01) -> dict[str, list[IslandDecision]]:
    """Islands for every graph of a bundle; the progress over all feeds is shown on stderr.

    Args:
        models: graph name -> FP32 ONNX graph.
        feeds: graph name -> recorded feeds (calibration.trajectories.record_feeds).
        fp16_rule: the nodes the FP16 pass's rules put in FP16; only they are candidates (the
            others are FP32 islands already).
        headroom, max_flushed: as for choose_fp32_islands.
    Returns:
        graph name -> the IslandDecisions for it (possibly empty).
    """
    decisions = {}
    with progress(sum(len(feeds[name]) for name in models), "calibrate: activation statistics", "feed") as bar:
        for name, model in models.items():
            stats = activation_stats(model, feeds[name], nodes=set(fp16_rule(model)),
                                     on_feed=lambda: bar.update(1))
            decisions[name] = choose_fp32_islands(stats, headroom, max_flushed)
    return decisions
