"""The noise protocol (docs/contracts.md): every random number of one sampling call, drawn up front.

All randomness comes from `numpy.random.default_rng(seed)` (PCG64) in a fixed order, so the
same seed gives the same noise on every backend and on every machine, and trajectories of
two backends can be compared token by token:

1. `y_init = rng.standard_normal((B, P, D)).astype(np.float32)`   (fuji and seq only)
2. `u = rng.random((T_x, B, L))`  float64 uniforms, one per token per token step.
3. `y_candidates = rng.standard_normal((C - 1, B, P, D)).astype(np.float32)`   (seq with C > 1
   latent candidates only: prompted SEQ chains C latents and keeps the one that best explains
   the clamped tokens, runtimes/samplers.py). Drawn last, so C = 1 is the noise of 1. and 2.

Nothing else is random: the latent update is deterministic DDIM (eta = 0). Both samplers take
a Noise: the reference (training/sampling.py) draws its own through draw_noise too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from runtimes.errors import LddmError


@dataclass
class Noise:
    """The draws of one sampling call.

    Attributes:
        u: float64 uniforms, shape [T_x, B, L]; u[k] drives the categorical draw of token step k.
        y_init: float32 initial latent, shape [B, P, D], or None for mdlm.
        y_candidates: float32 initial latents of SEQ's further latent candidates, [C - 1, B, P, D],
            or None (one candidate: y_init).
    """

    u: np.ndarray | torch.Tensor
    y_init: np.ndarray | torch.Tensor | None
    y_candidates: np.ndarray | torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return int(self.u.shape[1])

    @property
    def token_steps(self) -> int:
        return int(self.u.shape[0])

    @property
    def latent_candidates(self) -> int:
        return 1 if self.y_candidates is None else 1 + int(self.y_candidates.shape[0])

    def initial_latents(self) -> list:
        """y_init, then every further candidate's initial latent ([B, P, D] each)."""
        return [self.y_init, *([] if self.y_candidates is None else list(self.y_candidates))]

    def to(self, device: str | torch.device) -> "Noise":
        """The same draws as torch tensors on `device`: one host-to-device copy per array."""
        def moved(array):
            return None if array is None else torch.as_tensor(array).to(device)

        return Noise(moved(self.u), moved(self.y_init), moved(self.y_candidates))


def check_latent_candidates(variant: str, candidates: int, known) -> None:
    """C > 1 latent candidates are SEQ's, and are chosen by the clamped tokens, so need them."""
    if candidates > 1 and variant != "seq":
        raise LddmError(f"latent candidates apply to seq sampling only, not to {variant}; use one")
    if candidates > 1 and known is None:
        raise LddmError("latent candidates are chosen by how well each explains the clamped tokens; "
                        "without a prompt or template use one")


def latent_shape(variant: str, shapes: dict) -> tuple[int, int] | None:
    """draw_noise's latent_shape for a variant: (P, D) from the bundle's shapes, None for mdlm."""
    return None if variant == "mdlm" else (shapes["P"], shapes["D"])


def draw_noise(seed: int, batch: int, token_steps: int, seq_len: int,
               latent_shape: tuple[int, int] | None = None, latent_candidates: int = 1) -> Noise:
    """Draw the noise of one sampling call in the contract's order.

    Args:
        seed: the generator seed (a CLI sampling K > B samples uses seed + b for batch b).
        batch: B, the number of samples in this call.
        token_steps: T_x, the number of token (unmasking) steps.
        seq_len: L, tokens per sample.
        latent_shape: (P, D) for fuji and seq; None for mdlm (no latent is drawn); see latent_shape().
        latent_candidates: C, SEQ's initial latents (C > 1 needs latent_shape).
    Returns:
        Noise with u float64 [T_x, B, L], y_init float32 [B, P, D] (or None) and y_candidates
        float32 [C - 1, B, P, D] (or None), numpy arrays.
    """
    rng = np.random.default_rng(seed)
    y_init = y_candidates = None
    if latent_shape is not None:
        y_init = rng.standard_normal((batch, *latent_shape)).astype(np.float32)
    u = rng.random((token_steps, batch, seq_len))
    if latent_candidates > 1:
        if latent_shape is None:
            raise LddmError("latent candidates are SEQ's initial latents; pass latent_shape=(P, D)")
        y_candidates = rng.standard_normal((latent_candidates - 1, batch, *latent_shape)).astype(np.float32)
    return Noise(u, y_init, y_candidates)


def batch_noises(seed: int, num: int, batch_size: int, token_steps: int, seq_len: int,
                 latent_shape: tuple[int, int] | None = None, latent_candidates: int = 1) -> Iterator[tuple[int, Noise]]:
    """The noise of `num` samples drawn in batches, as every sampler and the CLIs draw it: batch b
    (rows start .. start + batch - 1, at most batch_size) from seed + b (docs/contracts.md).

    Yields:
        (start, Noise) per batch, in order.
    """
    for b, start in enumerate(range(0, num, batch_size)):
        yield start, draw_noise(seed + b, min(batch_size, num - start), token_steps, seq_len, latent_shape,
                                latent_candidates)
