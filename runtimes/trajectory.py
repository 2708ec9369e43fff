"""What a sampler hands back, in the one vocabulary of both samplers.

The reference sampler (training/sampling.py) and the runtime sampler (runtimes/samplers.py)
both report every step of a chain as a `Step` to their callback, and return `Samples`. Pure:
dataclasses and torch only, so training/ may import it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Step:
    """The state after one step of a chain, as Sampler.steps() yields it.

    Attributes:
        phase: "token" (an unmasking step) or "latent" (a SEQ latent-chain step).
        index: 0-based step number within its chain; total: steps in that chain.
        t, s: the step went from time t to time s < t.
        x: tokens after the step, int64 [B, L] (during SEQ's latent chain: the start, all mask but
            the known tokens).
        y: the running latent after the step, float32 [B, P, D] (SEQ token chain: the clean y0);
            None for mdlm.
        y0_hat: the network's latent estimate at this step, float32 [B, P, D]; None for mdlm and
            for SEQ token steps.
        network_called: False when the step ran no graph: MDLM's cache reused the dense
            log_probs, or with the sparse head no position unmasked (MDLM, SEQ's token chain).
    """

    phase: str
    index: int
    total: int
    t: float
    s: float
    x: torch.Tensor
    y: torch.Tensor | None
    y0_hat: torch.Tensor | None
    network_called: bool = True


@dataclass
class Samples:
    """What a sampling call returns.

    Attributes:
        tokens: int64 [B, L], no mask token left.
        latent: float32 [B, P, D], the clean latent (fuji: the last y0_hat; seq: the latent
            chain's last y0_hat); None for mdlm.
    """

    tokens: torch.Tensor
    latent: torch.Tensor | None
