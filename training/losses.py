"""Training losses: lambda_x * L_x + lambda_y * L_y for MDLM, FUJI and SEQ; next-token CE for AR.

L_x  masked-token cross-entropy. "elbo" weighting is MDLM's continuous-time NELBO:
     sum over masked tokens of -alpha'(t)/(1 - alpha(t)) * CE, divided by B * L (nats/token,
     an upper bound on the data entropy). "constant" is the mean CE over masked tokens.
L_y  MSE between y0_hat and y0 = encoder(x0) (target detached); "elbo" multiplies each
     sample's MSE by LatentSchedule.elbo_weight(t).

Two-stage training (stage is 1 or 2, chosen by the trainer):
  stage 1: the encoder is trained through L_x only (FUJI: the MM-DiT sees the noised
           encoder latent; SEQ: the token denoiser sees the clean encoder latent).
  stage 2: the encoder is frozen (the trainer turns its gradients off); both losses train.
A third, LATENT_ONLY (SEQ, `lddm-train --latent-from`): L_y alone trains a new latent denoiser
for a trained model's frozen encoder and token denoiser; L_x is not computed.

A prompt-aware SEQ latent denoiser (config.prompt_latent) is given random clamps of x0
(random_clamps), so it learns y0 given the noisy latent and whatever tokens a prompt fixes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.model import LDDM
from training.schedules import latent_schedule, mask_schedule

WEIGHTINGS = ("elbo", "constant")
LATENT_ONLY = 3  # the stage that trains SEQ's latent denoiser alone
T_MIN = 1e-3  # t is clamped away from 0, where the ELBO weight 1/t blows up (MDLM's sampling_eps)


@dataclass(frozen=True)
class LossOptions:
    token_weighting: str = "elbo"
    latent_weighting: str = "constant"
    p_cfg: float = 0.0  # probability of zeroing the latent fed to the token denoiser


@dataclass
class LossTerms:
    """The total to backpropagate and its parts (floats for logging)."""
    total: torch.Tensor
    loss_x: float
    loss_y: float


# ----------------------------------------------------------------------------- sampling helpers

def sample_times(batch_size: int, generator: torch.Generator, t_min: float = T_MIN) -> torch.Tensor:
    """Low-discrepancy t ~ U(t_min, 1): one uniform offset plus B evenly spaced strata.

    Every batch covers [0, 1) evenly, which lowers the variance of the ELBO estimate (MDLM's
    antithetic sampling).

    Returns:
        float32 [B] in [t_min, 1).
    """
    u = torch.rand(1, generator=generator)
    strata = torch.remainder(u + torch.arange(batch_size) / batch_size, 1.0)  # (B,)
    return t_min + (1.0 - t_min) * strata


def mask_tokens(x0: torch.Tensor, t: torch.Tensor, alpha: torch.Tensor, mask_id: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward masking: each token is masked independently with probability 1 - alpha(t).

    Args:
        x0: int64 [B, L]; t, alpha: float [B].
    Returns:
        x_t int64 [B, L] and the boolean mask [B, L] of masked positions.
    """
    masked = torch.rand(x0.shape, generator=generator) < (1.0 - alpha)[:, None]
    masked = masked.to(x0.device)
    return torch.where(masked, torch.full_like(x0, mask_id), x0), masked


def drop_latent(y: torch.Tensor, p: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent dropout: zero a sample's latent with probability p. Returns (y, kept [B] bool)."""
    kept = (torch.rand(y.shape[0], generator=generator) >= p).to(y.device)
    return y * kept[:, None, None].to(y.dtype), kept


def random_clamps(x0: torch.Tensor, mask_id: int, generator: torch.Generator) -> torch.Tensor:
    """What a prompt-aware latent denoiser is trained to read: x0 clamped at random, the mask
    id elsewhere. Each sample is one of four kinds, equally likely: nothing clamped (unprompted),
    a prefix of 1..L-1 tokens (continuation), everything but one span of 1..L-1 tokens
    (infilling), or each token with probability r ~ U(0, 1) (scattered hints).

    Args:
        x0: int64 [B, L] clean tokens.
    Returns:
        int64 [B, L] on x0's device.
    """
    B, L = x0.shape
    kind = torch.randint(0, 4, (B, 1), generator=generator)
    length = torch.randint(1, L, (B, 1), generator=generator)   # of the prefix, or of the hole
    start = (torch.rand(B, 1, generator=generator) * (L - length + 1)).long()
    scattered = torch.rand(B, L, generator=generator) < torch.rand(B, 1, generator=generator)
    position = torch.arange(L)[None]
    in_hole = (position >= start) & (position < start + length)
    clamp = torch.where(kind == 1, position < length, torch.where(kind == 2, ~in_hole, (kind == 3) & scattered))
    return torch.where(clamp.to(x0.device), x0, torch.full_like(x0, mask_id))


# ----------------------------------------------------------------------------- loss terms

def token_loss(log_probs: torch.Tensor, x0: torch.Tensor, masked: torch.Tensor, t: torch.Tensor,
               model: LDDM, weighting: str) -> torch.Tensor:
    """L_x over masked positions.

    Args:
        log_probs: float32 [B, L, V]; x0: int64 [B, L]; masked: bool [B, L]; t: float [B].
    Returns:
        scalar tensor (nats per token for "elbo", per masked token for "constant").
    """
    ce = -log_probs.gather(-1, x0[..., None]).squeeze(-1) * masked  # (B, L)
    if weighting == "elbo":
        w = mask_schedule(model.cfg).elbo_weight(t.double()).float().to(ce.device)  # (B,)
        return (ce * w[:, None]).sum() / ce.numel()
    return ce.sum() / masked.sum().clamp_min(1)


def latent_loss(y0_hat: torch.Tensor, y0: torch.Tensor, t: torch.Tensor, model: LDDM,
                weighting: str, kept: torch.Tensor | None = None) -> torch.Tensor:
    """L_y: MSE on y0 (target detached), per sample mean over [P, D], averaged over kept samples."""
    mse = ((y0_hat.float() - y0.detach()) ** 2).mean(dim=(1, 2))  # (B,)
    if weighting == "elbo":
        mse = mse * latent_schedule(model.cfg).elbo_weight(t.double()).float().to(mse.device)
    if kept is None:
        return mse.mean()
    return (mse * kept).sum() / kept.sum().clamp_min(1)


def noise_latent(y0: torch.Tensor, t: torch.Tensor, model: LDDM, generator: torch.Generator) -> torch.Tensor:
    """y_t = alpha_bar(t) y0 + sigma_bar(t) eps, eps ~ N(0, I). y0: float32 [B, P, D]."""
    a, s = latent_schedule(model.cfg).alpha_sigma(t.double())
    eps = torch.randn(y0.shape, generator=generator).to(y0.device)
    return a.float().to(y0.device)[:, None, None] * y0 + s.float().to(y0.device)[:, None, None] * eps


def encode(model: LDDM, x0: torch.Tensor, masked: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """y0 = encoder(x0), with optional corruption of encoder inputs at masked positions."""
    p = model.cfg.encoder_input_corruption
    if p > 0:
        corrupt = masked & (torch.rand(x0.shape, generator=generator) < p).to(x0.device)
        x0 = torch.where(corrupt, torch.full_like(x0, model.cfg.mask_id), x0)
    return model.encoder(x0)


# ----------------------------------------------------------------------------- per variant

def compute_loss(model: LDDM, x0: torch.Tensor, generator: torch.Generator, stage: int,
                 lambda_y: float, opts: LossOptions) -> LossTerms:
    """One minibatch loss for the model's variant.

    Args:
        model: the LDDM (any variant).
        x0: int64 [B, L] clean tokens, on the model's device.
        generator: CPU generator for every random draw (t, masks, noise, dropout).
        stage: 1 (L_x only, encoder trained), 2 (both losses, encoder frozen by the trainer) or,
            for seq, LATENT_ONLY (L_y only; loss_x is NaN, as it is not computed).
        lambda_y: weight of L_y (ignored in stage 1 and for mdlm/ar).
        opts: weightings and latent dropout.
    Returns:
        LossTerms; `total` carries the graph.
    """
    variant = model.cfg.variant
    if variant == "ar":
        return _ar_loss(model, x0)
    B = x0.shape[0]
    t = sample_times(B, generator)
    alpha = mask_schedule(model.cfg).alpha(t.double()).float()
    x_t, masked = mask_tokens(x0, t, alpha, model.cfg.mask_id, generator)
    t_dev = t.to(x0.device)
    if variant == "mdlm":
        loss_x = token_loss(model.denoiser(x_t, t_dev), x0, masked, t, model, opts.token_weighting)
        return LossTerms(loss_x, loss_x.item(), 0.0)
    y0 = encode(model, x0, masked, generator)  # (B, P, D)
    if variant == "fuji":
        y_t = noise_latent(y0, t, model, generator)
        y_t, kept = drop_latent(y_t, opts.p_cfg, generator)
        log_probs, y0_hat = model.denoiser(x_t, y_t, t_dev)
        loss_x = token_loss(log_probs, x0, masked, t, model, opts.token_weighting)
        loss_y = latent_loss(y0_hat, y0, t, model, opts.latent_weighting, kept)
    else:  # seq: the token denoiser sees the clean latent; the latent denoiser has its own t
        if stage != LATENT_ONLY:
            y_in, _ = drop_latent(y0, opts.p_cfg, generator)
            log_probs, _ = model.token_denoiser(x_t, y_in, t_dev)
            loss_x = token_loss(log_probs, x0, masked, t, model, opts.token_weighting)
        if stage == 1:
            return LossTerms(loss_x, loss_x.item(), 0.0)
        t_y = sample_times(B, generator)
        y_t = noise_latent(y0.detach(), t_y, model, generator)
        clamped = random_clamps(x0, model.cfg.mask_id, generator) if model.cfg.prompt_latent else None
        y0_hat = model.latent_denoiser(y_t, t_y.to(x0.device), clamped)
        loss_y = latent_loss(y0_hat, y0, t_y, model, opts.latent_weighting)
        if stage == LATENT_ONLY:
            return LossTerms(loss_y, float("nan"), loss_y.item())
    if stage == 1:
        return LossTerms(loss_x, loss_x.item(), loss_y.item())
    return LossTerms(loss_x + lambda_y * loss_y, loss_x.item(), loss_y.item())


def _ar_loss(model: LDDM, x0: torch.Tensor) -> LossTerms:
    """Next-token CE: input [mask, x_0..x_{L-2}] (the mask id is BOS), targets x_0..x_{L-1}, t = 0."""
    bos = torch.full_like(x0[:, :1], model.cfg.mask_id)
    inputs = torch.cat([bos, x0[:, :-1]], dim=1)  # (B, L)
    log_probs = model.denoiser(inputs, torch.zeros(x0.shape[0], device=x0.device))  # (B, L, V)
    loss = F.nll_loss(log_probs.flatten(0, 1), x0.flatten())
    return LossTerms(loss, loss.item(), 0.0)


# ----------------------------------------------------------------------------- lambda_y ramp

def lambda_y_at(step: int, target: float, warmup: int, delay: int = 0) -> float:
    """lambda_y after `step` steps of its ramp: 0 for `delay` steps, then linear to `target`
    over `warmup` steps ("delayed warmup"; delay = 0 is the plain linear warmup)."""
    if warmup <= 0:
        return target if step >= delay else 0.0
    return target * min(1.0, max(0.0, (step - delay) / warmup))
