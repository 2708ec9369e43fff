"""Reference samplers (MDLM, FUJI, SEQ): the loops the runtimes must reproduce token for token.

Everything here follows docs/contracts.md exactly:
- time grid t_k = 1 - k / T, k = 0..T (runtimes.schedules.time_grid); step k goes from t = t_k
  to s = t_{k+1}; the network sees t as float32 [B]; schedule scalars are Python floats (float64);
- noise protocol: all randomness is drawn up front by `make_draws` from
  numpy.random.default_rng(seed): first y_init (fuji, seq), then the token-step uniforms u
  (through runtimes.noise.draw_noise, the protocol's one implementation);
- token step: the MDLM bridge with float64 categorical draws and SUBS carry-over;
- latent step: DDIM (eta = 0); the returned latent is the last y0_hat (final noise removal).

The samplers take the model and the draws (DiT's `p_sample_loop(model, shape, noise)`), so a
parity test feeds the same draws to the runtime sampler and compares token by token.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch

from runtimes.noise import draw_noise
from runtimes.options import MAX_BATCH, MAX_SAMPLES, MAX_STEPS, check_int
from runtimes.schedules import latent_steps_for, time_grid
from training.config import ModelConfig
from training.model import LDDM
from training.schedules import latent_schedule, mask_schedule

StepCallback = Callable[[int, torch.Tensor], None]


class Samples(NamedTuple):
    """What a sampler returns.

    tokens: int64 [B, L], no mask token left.
    latent: float32 [B, P, D], the clean latent (fuji, seq); None for mdlm.
    """

    tokens: torch.Tensor
    latent: torch.Tensor | None


# ----------------------------------------------------------------------------- noise and grid

def make_draws(seed: int, batch: int, cfg: ModelConfig, token_steps: int) -> dict[str, np.ndarray]:
    """All the randomness of one sampling call, in the contract's fixed order.

    Args:
        seed: seeds numpy.random.default_rng (PCG64).
        batch: B, the number of samples.
        cfg: the model config (L, P, D and whether the variant has a latent).
        token_steps: T_x, the number of token steps.
    Returns:
        {"y_init": float32 [B, P, D] (fuji, seq only), "u": float64 [T_x, B, L]}.
    """
    check_int("batch", batch, 1, MAX_BATCH, ValueError)
    check_int("token_steps", token_steps, 1, MAX_STEPS, ValueError)
    noise = draw_noise(seed, batch, token_steps, cfg.seq_len,
                       (cfg.n_latent, cfg.latent_dim) if cfg.has_latent else None)
    return noise.as_draws()


def _float64_scalar(fn, t: float) -> float:
    """Evaluate a schedule (written for tensors) at one time, in float64, as a Python float."""
    return float(fn(torch.tensor(t, dtype=torch.float64)))


# ----------------------------------------------------------------------------- the two updates

def token_step(x_t: torch.Tensor, log_probs: torch.Tensor, u_k: torch.Tensor, alpha_t: float,
               alpha_s: float, mask_id: int, float64: bool = True) -> torch.Tensor:
    """One MDLM bridge step from t to s < t; unmasked tokens are carried over (SUBS).

    A masked token is unmasked to v with probability p(v) (alpha_s - alpha_t) / (1 - alpha_t)
    and stays masked with probability (1 - alpha_s) / (1 - alpha_t); the normalisation is folded
    into `u_k * cdf[..., -1]`. The draw is an inverse-CDF lookup of one uniform per token.

    Args:
        x_t: int64 [B, L], tokens at t (mask_id where masked).
        log_probs: float32 [B, L, V], log p(x0 | x_t, ...) with SUBS applied (mask column ~ -1e4).
        u_k: float64 [B, L], this step's uniforms in [0, 1).
        alpha_t, alpha_s: masking alpha at t and s (Python floats, alpha_s > alpha_t).
        mask_id: the mask token id (the last column of log_probs).
        float64: draw in float64 (the paper's choice); False trades precision for speed.
    Returns:
        int64 [B, L], tokens at s.
    """
    dtype = torch.float64 if float64 else torch.float32
    probs = log_probs.to(dtype).exp()  # (B, L, V); the mask column is exp(-1e4) = 0
    q = probs * (alpha_s - alpha_t)
    q[..., mask_id] = 1.0 - alpha_s
    cdf = q.cumsum(-1)  # (B, L, V)
    target = (u_k.to(dtype) * cdf[..., -1]).unsqueeze(-1)  # (B, L, 1)
    x_new = torch.searchsorted(cdf, target).squeeze(-1).clamp_max(log_probs.shape[-1] - 1)
    return torch.where(x_t == mask_id, x_new, x_t)


def ddim_step(y_t: torch.Tensor, y0_hat: torch.Tensor, a_t: float, sig_t: float,
              a_s: float, sig_s: float) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from t to s: float32 tensors, float64 scalars.

    Args:
        y_t: float32 [B, P, D]; y0_hat: float32 [B, P, D], the network's clean-latent estimate.
        a_t, sig_t, a_s, sig_s: alpha_bar and sigma_bar at t and s (Python floats).
    Returns:
        float32 [B, P, D], y at s.
    """
    eps_hat = (y_t - a_t * y0_hat) / sig_t
    return a_s * y0_hat + sig_s * eps_hat


# ----------------------------------------------------------------------------- chains

class _Chain:
    """The shared bookkeeping of one sampling call: device, schedules and the draws as tensors."""

    def __init__(self, model: LDDM, draws: dict[str, np.ndarray], token_steps: int, float64: bool):
        cfg = model.cfg
        check_int("token_steps", token_steps, 1, MAX_STEPS, ValueError)
        u = draws.get("u")
        if u is None or u.ndim != 3 or u.shape[0] != token_steps or u.shape[2] != cfg.seq_len:
            got = None if u is None else tuple(u.shape)
            raise ValueError(f"draws['u'] must have shape (token_steps={token_steps}, B, L={cfg.seq_len}), "
                             f"got {got}; build the draws with make_draws(seed, B, cfg, {token_steps})")
        self.cfg, self.float64 = cfg, float64
        self.device = next(model.parameters()).device
        self.batch = u.shape[1]
        self.u = torch.from_numpy(u).to(self.device)  # (T_x, B, L) float64
        self.mask_alpha = mask_schedule(cfg).alpha
        self.latent_sched = latent_schedule(cfg)
        self.y_init = None
        if cfg.has_latent:
            y_init = draws.get("y_init")
            want = (self.batch, cfg.n_latent, cfg.latent_dim)
            if y_init is None or tuple(y_init.shape) != want:
                got = None if y_init is None else tuple(y_init.shape)
                raise ValueError(f"draws['y_init'] must have shape {want}, got {got}; "
                                 f"build the draws with make_draws for this model's config")
            self.y_init = torch.from_numpy(np.ascontiguousarray(y_init, dtype=np.float32)).to(self.device)

    def all_masked(self) -> torch.Tensor:
        return torch.full((self.batch, self.cfg.seq_len), self.cfg.mask_id, dtype=torch.long, device=self.device)

    def t_tensor(self, t: float) -> torch.Tensor:
        return torch.full((self.batch,), t, dtype=torch.float32, device=self.device)

    def token_update(self, k: int, x: torch.Tensor, log_probs: torch.Tensor, t: float, s: float) -> torch.Tensor:
        alpha_t = _float64_scalar(self.mask_alpha, t)
        alpha_s = _float64_scalar(self.mask_alpha, s)
        return token_step(x, log_probs, self.u[k], alpha_t, alpha_s, self.cfg.mask_id, self.float64)

    def latent_update(self, y: torch.Tensor, y0_hat: torch.Tensor, t: float, s: float) -> torch.Tensor:
        a_t, sig_t = (float(v) for v in self.latent_sched.alpha_sigma(torch.tensor(t, dtype=torch.float64)))
        a_s, sig_s = (float(v) for v in self.latent_sched.alpha_sigma(torch.tensor(s, dtype=torch.float64)))
        return ddim_step(y, y0_hat, a_t, sig_t, a_s, sig_s)


def _require_variant(model: LDDM, variant: str) -> None:
    if model.cfg.variant != variant:
        raise ValueError(f"sample_{variant} needs a {variant!r} model, got variant {model.cfg.variant!r}; "
                         f"use sample_{model.cfg.variant} or sample()")


@torch.no_grad()
def sample_mdlm(model: LDDM, draws: dict[str, np.ndarray], steps: int, cache: bool = False,
                float64: bool = True, on_step: StepCallback | None = None) -> Samples:
    """MDLM: start all masked, T token steps of the denoiser.

    Args:
        model: an "mdlm" LDDM (put in eval mode here).
        draws: from make_draws(seed, B, cfg, steps).
        steps: T.
        cache: reuse the previous log_probs when x did not change in the previous step
            (MDLM's caching; the network is then not called).
        float64: float64 categorical draws (False: float32, faster, see the SWD benchmark).
        on_step: called as on_step(k, x_s) after every token step (for instrumentation).
    Returns:
        Samples(tokens int64 [B, L], latent None).
    """
    _require_variant(model, "mdlm")
    model.eval()
    chain = _Chain(model, draws, steps, float64)
    grid = time_grid(steps)
    x = chain.all_masked()
    x_prev, log_probs = None, None
    for k in range(steps):
        t, s = grid[k], grid[k + 1]
        if not (cache and x_prev is not None and torch.equal(x, x_prev)):
            log_probs = model.denoiser(x, chain.t_tensor(t))
        x_prev = x
        x = chain.token_update(k, x, log_probs, t, s)
        if on_step is not None:
            on_step(k, x)
    return Samples(x, None)


@torch.no_grad()
def sample_fuji(model: LDDM, draws: dict[str, np.ndarray], steps: int, float64: bool = True,
                on_step: StepCallback | None = None) -> Samples:
    """FUJI: tokens and latent denoised jointly, one network call per step on one time grid.

    Args:
        model: a "fuji" LDDM.
        draws: from make_draws(seed, B, cfg, steps) (holds y_init and u).
        steps: T (token and latent steps alike).
        float64, on_step: as in sample_mdlm.
    Returns:
        Samples(tokens int64 [B, L], latent float32 [B, P, D] = the last y0_hat).
    """
    _require_variant(model, "fuji")
    model.eval()
    chain = _Chain(model, draws, steps, float64)
    grid = time_grid(steps)
    x, y = chain.all_masked(), chain.y_init
    y0_hat = None
    for k in range(steps):
        t, s = grid[k], grid[k + 1]
        log_probs, y0_hat = model.denoiser(x, y, chain.t_tensor(t))
        x = chain.token_update(k, x, log_probs, t, s)
        y = chain.latent_update(y, y0_hat, t, s)
        if on_step is not None:
            on_step(k, x)
    return Samples(x, y0_hat)


@torch.no_grad()
def sample_seq(model: LDDM, draws: dict[str, np.ndarray], token_steps: int, latent_steps: int,
               float64: bool = True, on_step: StepCallback | None = None) -> Samples:
    """SEQ: a latent chain of T_y DDIM steps, then a token chain of T_x steps on the clean latent.

    Args:
        model: a "seq" LDDM.
        draws: from make_draws(seed, B, cfg, token_steps).
        token_steps: T_x; latent_steps: T_y (each on its own grid t_k = 1 - k / T).
        float64, on_step: as in sample_mdlm (on_step sees the token chain only).
    Returns:
        Samples(tokens int64 [B, L], latent float32 [B, P, D] = the latent chain's last y0_hat).
    """
    _require_variant(model, "seq")
    check_int("latent_steps", latent_steps, 1, MAX_STEPS, ValueError)
    model.eval()
    chain = _Chain(model, draws, token_steps, float64)
    y = chain.y_init
    grid = time_grid(latent_steps)
    y0 = None
    for k in range(latent_steps):
        t, s = grid[k], grid[k + 1]
        y0 = model.latent_denoiser(y, chain.t_tensor(t))
        y = chain.latent_update(y, y0, t, s)
    grid = time_grid(token_steps)
    x = chain.all_masked()
    for k in range(token_steps):
        t, s = grid[k], grid[k + 1]
        log_probs, _ = model.token_denoiser(x, y0, chain.t_tensor(t))
        x = chain.token_update(k, x, log_probs, t, s)
        if on_step is not None:
            on_step(k, x)
    return Samples(x, y0)


@torch.no_grad()
def sample_ar(model: LDDM, seed: int, num: int, batch_size: int = 256) -> torch.Tensor:
    """Ancestral samples of the AR reference model (the evaluator's own samples).

    Token i is the inverse-CDF draw, in float64, of p(x_i | x_<i) at one uniform; batch b
    draws its uniforms u [L, B] from numpy.random.default_rng(seed + b). No KV cache: each
    position costs one full forward pass (the causal mask hides the positions not yet drawn).

    Returns:
        int64 [num, L] on the CPU, in the data vocabulary (the mask id is never drawn).
    """
    if model.cfg.variant != "ar":
        raise ValueError(f"sample_ar needs an 'ar' model, got variant {model.cfg.variant!r}")
    check_int("num", num, 1, MAX_SAMPLES, ValueError)
    check_int("batch_size", batch_size, 1, MAX_BATCH, ValueError)
    model.eval()
    cfg, device = model.cfg, next(model.parameters()).device
    out = []
    for b, start in enumerate(range(0, num, batch_size)):
        B = min(batch_size, num - start)
        u = torch.from_numpy(np.random.default_rng(seed + b).random((cfg.seq_len, B))).to(device)
        # [BOS, x_0, .., x_{L-1}], the mask id as BOS and as the placeholder of undrawn tokens
        seq = torch.full((B, cfg.seq_len + 1), cfg.mask_id, dtype=torch.long, device=device)
        t = torch.zeros(B, device=device)
        for i in range(cfg.seq_len):
            cdf = model.denoiser(seq[:, :-1], t)[:, i].double().exp().cumsum(-1)  # (B, V)
            drawn = torch.searchsorted(cdf, (u[i] * cdf[:, -1])[:, None]).squeeze(-1)
            seq[:, i + 1] = drawn.clamp_max(cfg.vocab_size - 1)
        x = seq[:, 1:]
        out.append(x.cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------- convenience

def sample_draws(model: LDDM, draws: dict[str, np.ndarray], steps: int, latent_steps: int | None = None,
                 cache: bool = False, float64: bool = True) -> Samples:
    """The variant's sampler on given draws: sample_mdlm (with `cache`), sample_fuji, or
    sample_seq with latent_steps (default: steps)."""
    variant = model.cfg.variant
    if variant == "mdlm":
        return sample_mdlm(model, draws, steps, cache=cache, float64=float64)
    if variant == "fuji":
        return sample_fuji(model, draws, steps, float64=float64)
    return sample_seq(model, draws, steps, latent_steps_for(variant, steps, latent_steps), float64=float64)


def sample(model: LDDM, seed: int, num: int, steps: int, latent_steps: int | None = None,
           batch_size: int = 256, cache: bool = False, float64: bool = True) -> Samples:
    """Draw `num` samples in batches of `batch_size`; batch b uses seed + b (the CLI convention).

    Args:
        model: an mdlm, fuji or seq LDDM.
        seed: the seed of batch 0.
        num: total number of samples.
        steps: token steps T_x (for fuji also the latent steps).
        latent_steps: seq only: T_y (default: steps).
        batch_size: samples per batch.
        cache: mdlm only, see sample_mdlm.
        float64: see sample_mdlm.
    Returns:
        Samples(tokens int64 [num, L] on the CPU, latent float32 [num, P, D] on the CPU or None).
    """
    variant = model.cfg.variant
    if variant not in ("mdlm", "fuji", "seq"):
        raise ValueError(f"variant {variant!r} is not a diffusion model; sample() takes mdlm, fuji or seq")
    check_int("num", num, 1, MAX_SAMPLES, ValueError)
    check_int("steps", steps, 1, MAX_STEPS, ValueError)
    check_int("batch_size", batch_size, 1, MAX_BATCH, ValueError)
    if latent_steps is not None and variant != "seq":
        raise ValueError(f"latent_steps applies to seq models only; this model is {variant!r}, leave it unset")
    if cache and variant != "mdlm":
        raise ValueError(f"cache applies to mdlm models only; this model is {variant!r}, leave it off")
    tokens, latents = [], []
    for b, start in enumerate(range(0, num, batch_size)):
        draws = make_draws(seed + b, min(batch_size, num - start), model.cfg, steps)
        out = sample_draws(model, draws, steps, latent_steps, cache, float64)
        tokens.append(out.tokens.cpu())
        if out.latent is not None:
            latents.append(out.latent.cpu())
    return Samples(torch.cat(tokens), torch.cat(latents) if latents else None)
