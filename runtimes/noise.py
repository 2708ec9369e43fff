"""The noise protocol (docs/contracts.md): every random number of one sampling call, drawn up front.

All randomness comes from `numpy.random.default_rng(seed)` (PCG64) in a fixed order, so the
same seed gives the same noise on every backend and on every machine, and trajectories of
two backends can be compared token by token:

1. `y_init = rng.standard_normal((B, P, D)).astype(np.float32)`   (fuji and seq only)
2. `u = rng.random((T_x, B, L))`  float64 uniforms, one per token per token step.

Nothing else is random: the latent update is deterministic DDIM (eta = 0). Both samplers take
a Noise: the reference (training/sampling.py) draws its own through draw_noise too.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Noise:
    """The draws of one sampling call.

    Attributes:
        u: float64 uniforms, shape [T_x, B, L]; u[k] drives the categorical draw of token step k.
        y_init: float32 initial latent, shape [B, P, D], or None for mdlm.
    """

    u: np.ndarray | torch.Tensor
    y_init: np.ndarray | torch.Tensor | None

    @property
    def batch(self) -> int:
        return int(self.u.shape[1])

    @property
    def token_steps(self) -> int:
        return int(self.u.shape[0])

    def to(self, device: str | torch.device) -> "Noise":
        """The same draws as torch tensors on `device`: one host-to-device copy per array."""
        u = torch.as_tensor(self.u).to(device)
        y = None if self.y_init is None else torch.as_tensor(self.y_init).to(device)
        return Noise(u, y)


def latent_shape(variant: str, shapes: dict) -> tuple[int, int] | None:
    """draw_noise's latent_shape for a variant: (P, D) from the bundle's shapes, None for mdlm."""
    return None if variant == "mdlm" else (shapes["P"], shapes["D"])


def draw_noise(seed: int, batch: int, token_steps: int, seq_len: int,
               latent_shape: tuple[int, int] | None = None) -> Noise:
    """Draw the noise of one sampling call in the contract's order.

    Args:
        seed: the generator seed (a CLI sampling K > B samples uses seed + b for batch b).
        batch: B, the number of samples in this call.
        token_steps: T_x, the number of token (unmasking) steps.
        seq_len: L, tokens per sample.
        latent_shape: (P, D) for fuji and seq; None for mdlm (no latent is drawn); see latent_shape().
    Returns:
        Noise with u float64 [T_x, B, L] and y_init float32 [B, P, D] (or None), numpy arrays.
    """
    rng = np.random.default_rng(seed)
    y_init = None
    if latent_shape is not None:
        y_init = rng.standard_normal((batch, *latent_shape)).astype(np.float32)
    u = rng.random((token_steps, batch, seq_len))
    return Noise(u, y_init)
