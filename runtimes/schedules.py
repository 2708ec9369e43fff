"""Schedule formulas from the manifest's names and constants (the same math as training/schedules.py).

The runtime must not import training/, so it re-implements these few lines. Values are Python
floats (float64), as the contract asks: they enter tensors as scalars. They are evaluated on
0-d float64 CPU tensors with the same expressions as training/schedules.py, so that even the
last bit (cos, sqrt) agrees with the reference sampler and trajectories match token for token.

    mask (tokens):   linear: alpha(t) = 1 - t;   loglinear: alpha(t) = 1 - (1 - eps) t
    latent (VP):     sqrt:   alpha_bar^2 = (1 - 2e) sqrt(1 - t) + e
                     cosine: alpha_bar^2 = (1 - 2e) cos^2(pi t / 2) + e,   sigma_bar^2 = 1 - alpha_bar^2

The time grid of a chain of T steps is t_k = 1 - k / T, k = 0..T (t_0 = 1 is pure noise). A
schedule's values on a chain's grid (on_grid) are computed once per process: a few 0-d tensor
ops per grid point are a sizeable share of a sampling call's own time at batch 1 (RESULTS.md).
"""
from __future__ import annotations

import functools
import math

import torch

from runtimes.bundle import LATENT_KINDS, MASK_KINDS
from runtimes.errors import BundleError


class MaskSchedule:
    """alpha(t): the probability that a token is still unmasked at time t."""

    def __init__(self, kind: str, eps: float):
        if kind not in MASK_KINDS:
            raise BundleError(f"mask schedule {kind!r} is unknown; expected one of {list(MASK_KINDS)}")
        self.kind, self.eps = kind, float(eps)
        self.slope = 1.0 if kind == "linear" else 1.0 - self.eps

    def alpha(self, t: float) -> float:
        return float(1.0 - self.slope * _f64(t))

    def on_grid(self, steps: int) -> tuple[float, ...]:
        """alpha(t_k) at every t_k of time_grid(steps)."""
        return _on_grid(MaskSchedule, self.kind, self.eps, steps, "alpha")


class LatentSchedule:
    """Variance-preserving latent schedule: y_t = alpha_bar(t) y0 + sigma_bar(t) eps."""

    def __init__(self, kind: str, eps: float):
        if kind not in LATENT_KINDS:
            raise BundleError(f"latent schedule {kind!r} is unknown; expected one of {list(LATENT_KINDS)}")
        self.kind, self.eps = kind, float(eps)

    def _alpha_bar_sq(self, t: torch.Tensor) -> torch.Tensor:
        e = self.eps
        if self.kind == "sqrt":
            return (1 - 2 * e) * torch.sqrt((1 - t).clamp_min(0.0)) + e
        return (1 - 2 * e) * torch.cos(0.5 * math.pi * t) ** 2 + e

    def alpha_sigma(self, t: float) -> tuple[float, float]:
        """(alpha_bar(t), sigma_bar(t)) as Python floats."""
        a2 = self._alpha_bar_sq(_f64(t))
        return float(a2.sqrt()), float((1 - a2).sqrt())

    def on_grid(self, steps: int) -> tuple[tuple[float, float], ...]:
        """alpha_sigma(t_k) at every t_k of time_grid(steps)."""
        return _on_grid(LatentSchedule, self.kind, self.eps, steps, "alpha_sigma")


def _f64(t: float) -> torch.Tensor:
    return torch.tensor(t, dtype=torch.float64)


def time_grid(steps: int) -> list[float]:
    """t_k = 1 - k / T for k = 0..T (T + 1 Python floats, from 1.0 down to 0.0)."""
    return [1.0 - k / steps for k in range(steps + 1)]


@functools.lru_cache(maxsize=256)
def _on_grid(schedule_class, kind: str, eps: float, steps: int, method: str) -> tuple:
    """The schedule's `method` (MaskSchedule.alpha, LatentSchedule.alpha_sigma) at every point of
    time_grid(steps), cached per schedule and chain length."""
    value = getattr(schedule_class(kind, eps), method)
    return tuple(value(t) for t in time_grid(steps))


def latent_steps_for(variant: str, token_steps: int, latent_steps: int | None = None) -> int | None:
    """SEQ's latent-chain length T_y: latent_steps when given, else T_x; None for other variants."""
    if variant != "seq":
        return None
    return latent_steps if latent_steps is not None else token_steps


def from_manifest(schedule: dict) -> tuple[MaskSchedule, LatentSchedule | None]:
    """Build the schedules of a manifest's "schedule" entry.

    Args:
        schedule: {"mask": {"kind", "eps"}, "latent": {"kind", "eps"} (absent or null for mdlm)}.
    Returns:
        (MaskSchedule, LatentSchedule or None).
    """
    try:
        mask = MaskSchedule(schedule["mask"]["kind"], schedule["mask"]["eps"])
        latent = schedule.get("latent")
        return mask, (LatentSchedule(latent["kind"], latent["eps"]) if latent else None)
    except (KeyError, TypeError):
        raise BundleError(f"manifest schedule {schedule!r} lacks a kind or eps; rebuild the bundle") from None
