"""Compare a graph's outputs with reference outputs, output by output (Polygraphy's comparator).

Every output is measured (max abs, max rel, relative L2, and for log-prob outputs the KL of
their softmax), every limit of its OutputTolerance is checked, and only then is
ToleranceExceeded raised, once, naming the graph and every output that failed. NaN or Inf in
an output always fails.

Python 3.10 syntax; numpy only (torch tensors are accepted and converted).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from runtimes.errors import ToleranceExceeded
from runtimes.tolerances import REL_FLOOR, OutputTolerance


@dataclass
class OutputReport:
    """What was measured for one output, and which limits it broke (empty when it passed).

    Errors are measured in float64 over all elements; kl is None for non-log-prob outputs.
    """

    max_abs: float
    max_rel: float
    rel_l2: float
    kl: float | None
    nonfinite: int
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def _as_float64(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, possibly on a GPU
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _softmax_kl(ref_log_probs: np.ndarray, got_log_probs: np.ndarray) -> float:
    """Mean over positions of KL(ref || got) of the distributions on the last axis."""
    p = np.exp(ref_log_probs)
    return float(np.mean(np.sum(p * (ref_log_probs - got_log_probs), axis=-1)))


def measure(got, ref, tolerance: OutputTolerance) -> OutputReport:
    """Measure one output against its reference and check it against its tolerance.

    Args:
        got: the output under test (numpy array or torch tensor), any float dtype.
        ref: the reference output, same shape.
        tolerance: the limits to check.
    Returns:
        OutputReport; report.failures names each broken limit with the measured value.
    """
    got, ref = _as_float64(got), _as_float64(ref)
    if got.shape != ref.shape:
        inf = float("inf")
        return OutputReport(inf, inf, inf, None, 0, [f"shape {list(got.shape)} != reference {list(ref.shape)}"])
    nonfinite = int(np.size(got) - np.count_nonzero(np.isfinite(got)))
    if nonfinite:
        inf = float("inf")
        return OutputReport(inf, inf, inf, None, nonfinite, [f"{nonfinite} NaN/Inf values"])
    diff = np.abs(got - ref)
    max_abs = float(diff.max(initial=0.0))
    max_rel = float((diff / np.maximum(np.abs(ref), REL_FLOOR)).max(initial=0.0))
    a, b = (np.exp(got), np.exp(ref)) if tolerance.on_softmax else (got, ref)
    rel_l2 = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
    kl = _softmax_kl(ref, got) if tolerance.on_softmax else None
    report = OutputReport(max_abs, max_rel, rel_l2, kl, 0)
    limits = [("max_rel", max_rel, tolerance.max_rel), ("rel_l2", rel_l2, tolerance.rel_l2),
              ("kl", kl, tolerance.kl)]
    for name, value, limit in limits:
        if limit is not None and value is not None and value > limit:
            what = f"{name} of softmax" if name == "rel_l2" and tolerance.on_softmax else name
            report.failures.append(f"{what} {value:.3g} > {limit:g}")
    return report


def compare_outputs(graph: str, got: dict, ref: dict,
                    tolerances: dict[str, OutputTolerance]) -> dict[str, OutputReport]:
    """Compare every output of one graph run; raise once if any output fails.

    Args:
        graph: the graph's name, for the error message (e.g. "denoiser (fp16, batch 3)").
        got: output name -> array/tensor under test.
        ref: output name -> reference array/tensor (same names).
        tolerances: output name -> OutputTolerance (runtimes.tolerances.graph_tolerances).
    Returns:
        output name -> OutputReport, when every output passed.
    Raises:
        ToleranceExceeded: naming the graph and each failing output with what was measured.
    """
    missing = sorted(set(tolerances) - set(got))
    if missing:
        raise ToleranceExceeded(f"graph {graph} did not return the outputs {missing}; "
                                f"it returned {sorted(got)}")
    reports = {name: measure(got[name], ref[name], tol) for name, tol in tolerances.items()}
    failed = [f"{name}: {', '.join(r.failures)}" for name, r in reports.items() if not r.passed]
    if failed:
        raise ToleranceExceeded(f"graph {graph} is outside its parity tolerance ({'; '.join(failed)})")
    return reports
