"""Noise schedules, as functions of t in [0, 1] (t = 1 is pure noise).

Masking (tokens): alpha(t) is the probability that a token is still unmasked at t.
    linear:    alpha(t) = 1 - t
    loglinear: alpha(t) = 1 - (1 - eps) t      (MDLM's "log-linear" noise, sigma = -log alpha)
Latent (variance preserving): y_t = alpha_bar(t) y0 + sigma_bar(t) eps, alpha_bar^2 + sigma_bar^2 = 1.
    sqrt:   alpha_bar^2 = (1 - 2e) sqrt(1 - t) + e
    cosine: alpha_bar^2 = (1 - 2e) cos^2(pi t / 2) + e

The runtime (runtimes/schedules.py) reimplements these few lines from the names and
constants in the manifest; tests/runtimes/test_schedules.py checks that both agree.
"""
from __future__ import annotations

import math

import torch


class MaskSchedule:
    def __init__(self, kind: str, eps: float):
        self.kind, self.eps = kind, eps
        self.slope = 1.0 if kind == "linear" else 1.0 - eps  # alpha(t) = 1 - slope * t

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1.0 - self.slope * t

    def elbo_weight(self, t: torch.Tensor) -> torch.Tensor:
        """-alpha'(t) / (1 - alpha(t)): the weight of the masked-token cross-entropy in the ELBO."""
        return self.slope / (self.slope * t).clamp_min(1e-6)


class LatentSchedule:
    def __init__(self, kind: str, eps: float):
        self.kind, self.eps = kind, eps

    def alpha_bar_sq(self, t: torch.Tensor) -> torch.Tensor:
        e = self.eps
        if self.kind == "sqrt":
            return (1 - 2 * e) * torch.sqrt((1 - t).clamp_min(0.0)) + e
        return (1 - 2 * e) * torch.cos(0.5 * math.pi * t) ** 2 + e

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a2 = self.alpha_bar_sq(t)
        return a2.sqrt(), (1 - a2).sqrt()

    def elbo_weight(self, t: torch.Tensor) -> torch.Tensor:
        """-SNR'(t) / 2, the ELBO weight of ||y0 - y0_hat||^2 for an x0-parameterised model."""
        t = t.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            a2 = self.alpha_bar_sq(t)
            snr = a2 / (1 - a2)
            (d_snr,) = torch.autograd.grad(snr.sum(), t)
        return (-0.5 * d_snr).detach()


def mask_schedule(cfg) -> MaskSchedule:
    return MaskSchedule(cfg.mask_schedule, cfg.mask_eps)


def latent_schedule(cfg) -> LatentSchedule:
    return LatentSchedule(cfg.latent_schedule, cfg.latent_eps)
