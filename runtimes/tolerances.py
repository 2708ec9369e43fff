"""Every parity tolerance of the project, in one place (docs/design.md, "Parity").

Three levels, each read by the export tests, by `lddm-export verify` and reported in
parity.json:

1. Per graph: an exported graph against the PyTorch module on the same inputs.
   - fp32: max relative error <= FP32_MAX_REL, where the relative error of one element is
     |got - ref| / max(|ref|, REL_FLOOR): relative above magnitude 1, absolute below. The
     outputs are on a unit scale (log-probs in nats, latents of unit RMS), so an element
     near zero is held to 1e-4 absolute rather than turning float32 round-off of the O(1)
     activations around it into a huge ratio. (ONNX Runtime's float32 Sin/Cos differ from
     torch's by ~3e-5 at the time embedding's arguments of up to 1000 rad; that noise reaches
     the outputs at ~1e-5 absolute.)
   - fp16: statistical. Relative L2 ||got - ref|| / ||ref|| <= FP16_REL_L2, taken on the
     softmax probabilities for `log_probs` (where sampling reads them) and on the values for
     latents; for `log_probs` also the mean KL(ref || got) per position <= FP16_KL.
   - int8: as fp16, with the limits INT8_REL_L2 and INT8_KL: an int8 linear layer's error is
     about 1% of its output, and the output projection to V sharpens it into the softmax
     (the shipped text examples' INT8 graphs measure a relative L2 of the softmax of 0.04-0.08).
   - NaN or Inf in an output always fails, at every precision.
2. Trajectory: token agreement between the runtime sampler on an exported graph and the
   reference sampler, same seed and noise, >= TRAJECTORY_TOKEN_AGREEMENT.
3. Distribution: samples of each precision vs the torch FP32 reference's, same seeds.
   Synthetic data: the sliced Wasserstein distance to the data within DISTRIBUTION_SWD_MARGIN
   (relative) of the reference's. Text: the generative perplexity under an AR evaluator
   within GEN_PPL_MARGIN, and the unigram entropy within ENTROPY_MARGIN. INT8 is held to
   INT8_DISTRIBUTION_MARGIN on every metric (the INT8 issue's target: quality within 10%).

Python 3.10 syntax and no imports of training/ or lddm_export/: a deployed runtime reads this.
"""
from __future__ import annotations

from dataclasses import dataclass

FP32_MAX_REL = 1e-4
REL_FLOOR = 1.0
FP16_REL_L2 = 1e-2
FP16_KL = 1e-3
TRAJECTORY_TOKEN_AGREEMENT = 0.999
DISTRIBUTION_SWD_MARGIN = 0.05
GEN_PPL_MARGIN = 0.02
ENTROPY_MARGIN = 0.05
INT8_REL_L2 = 0.15
INT8_KL = 2e-2
INT8_DISTRIBUTION_MARGIN = 0.10

# Outputs that are log-softmax over the last axis: the FP16 checks compare their softmax.
LOG_PROB_OUTPUTS = ("log_probs",)


@dataclass(frozen=True)
class OutputTolerance:
    """The limits one graph output must meet; a None limit is not checked.

    Attributes:
        max_rel: limit of the max elementwise relative error (floored denominator, see above).
        rel_l2: limit of the relative L2 error.
        kl: limit of the mean KL(ref || got) over all positions (log-prob outputs only).
        on_softmax: rel_l2 is taken on exp(values) (the probabilities) rather than the values.
    """

    max_rel: float | None = None
    rel_l2: float | None = None
    kl: float | None = None
    on_softmax: bool = False


def graph_tolerances(precision: str, output_names: list[str] | tuple[str, ...]) -> dict[str, OutputTolerance]:
    """Level-1 tolerances for each output of one graph at one precision.

    Args:
        precision: "fp32", "fp16" or "int8" (the ONNX graph's compute precision).
        output_names: the graph's output names (runtimes.spec.GraphSpec.output_names).
    Returns:
        output name -> OutputTolerance.
    Raises:
        ValueError: an unknown precision.
    """
    if precision == "fp32":
        return {name: OutputTolerance(max_rel=FP32_MAX_REL) for name in output_names}
    if precision in ("fp16", "int8"):
        rel_l2, kl = (FP16_REL_L2, FP16_KL) if precision == "fp16" else (INT8_REL_L2, INT8_KL)
        return {name: OutputTolerance(rel_l2=rel_l2, kl=kl, on_softmax=True)
                if name in LOG_PROB_OUTPUTS else OutputTolerance(rel_l2=rel_l2)
                for name in output_names}
    raise ValueError(f"unknown precision {precision!r}; expected 'fp32', 'fp16' or 'int8'")


def distribution_margin(margin: float, precision: str) -> float:
    """A level-3 metric's allowed relative difference at one precision."""
    return INT8_DISTRIBUTION_MARGIN if precision == "int8" else margin
