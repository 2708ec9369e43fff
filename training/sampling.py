"""Reference samplers (MDLM, FUJI, SEQ): the loops the runtimes must reproduce token for token.

Everything here follows docs/contracts.md exactly:
- time grid t_k = 1 - k / T, k = 0..T (runtimes.schedules.time_grid); step k goes from t = t_k
  to s = t_{k+1}; the network sees t as float32 [B]; schedule scalars are Python floats (float64);
- noise protocol: all randomness is drawn up front by `make_noise` from
  numpy.random.default_rng(seed): first y_init (fuji, seq), then the token-step uniforms u
  (through runtimes.noise.draw_noise, the protocol's one implementation);
- token step: the MDLM bridge with float64 categorical draws and SUBS carry-over;
- latent step: DDIM (eta = 0); the returned latent is the last y0_hat (final noise removal).

The samplers take the model and the noise (DiT's `p_sample_loop(model, shape, noise)`), so a
parity test feeds the same Noise to the runtime sampler and compares token by token. They speak
the runtime sampler's dialect (runtimes/samplers.py): a runtimes.noise.Noise in, a
runtimes.trajectory.Step to the callback after every step, runtimes.trajectory.Samples out,
and LddmErrors for bad input (runtimes.errors: OptionError for an integer out of its range,
ShapeMismatch for noise that does not fit the model, LddmError for a wrong variant or option).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from runtimes.errors import LddmError, ShapeMismatch
from runtimes.noise import Noise, batch_noises, check_latent_candidates, draw_noise
from runtimes.prompts import start_tokens
from runtimes.options import MAX_BATCH, MAX_SAMPLES, MAX_STEPS, check_int
from runtimes.schedules import latent_steps_for, time_grid
from runtimes.trajectory import Samples, Step
from training.config import ModelConfig
from training.model import LDDM
from training.schedules import latent_schedule, mask_schedule

# ----------------------------------------------------------------------------- noise and grid

def make_noise(seed: int, batch: int, cfg: ModelConfig, token_steps: int) -> Noise:
    """All the randomness of one sampling call, in the contract's fixed order.

    Args:
        seed: seeds numpy.random.default_rng (PCG64).
        batch: B, the number of samples.
        cfg: the model config (L, P, D and whether the variant has a latent).
        token_steps: T_x, the number of token steps.
    Returns:
        Noise with u float64 [T_x, B, L] and y_init float32 [B, P, D] (fuji, seq; None for
        mdlm), numpy arrays.
    Raises:
        OptionError: batch or token_steps is not an integer in its range.
    """
    check_int("batch", batch, 1, MAX_BATCH)
    check_int("token_steps", token_steps, 1, MAX_STEPS)
    return draw_noise(seed, batch, token_steps, cfg.seq_len, _latent_shape(cfg))


def _latent_shape(cfg: ModelConfig) -> tuple[int, int] | None:
    return (cfg.n_latent, cfg.latent_dim) if cfg.has_latent else None


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
    """The shared bookkeeping of one sampling call: device, schedules and the noise as tensors."""

    def __init__(self, model: LDDM, noise: Noise, float64: bool, known: torch.Tensor | None = None):
        cfg = model.cfg
        u, L = noise.u, cfg.seq_len
        if u.ndim != 3 or u.shape[0] < 1 or u.shape[2] != L:
            raise ShapeMismatch(f"noise.u must have shape [T_x >= 1, B, L = {L}], got {list(u.shape)}; "
                                f"draw the noise with make_noise(seed, B, cfg, T_x)")
        self.cfg, self.float64 = cfg, float64
        self.device = next(model.parameters()).device
        self.batch, self.token_steps = noise.batch, noise.token_steps
        self.mask_alpha = mask_schedule(cfg).alpha
        self.latent_sched = latent_schedule(cfg)
        if cfg.has_latent:
            want = [self.batch, cfg.n_latent, cfg.latent_dim]
            if noise.y_init is None or list(noise.y_init.shape) != want:
                got = None if noise.y_init is None else list(noise.y_init.shape)
                raise ShapeMismatch(f"noise.y_init must have shape [B, P, D] = {want}, got {got}; "
                                    f"draw the noise with make_noise(seed, B, cfg, T_x) for this model's config")
            if noise.y_candidates is not None and list(noise.y_candidates.shape[1:]) != want:
                raise ShapeMismatch(f"noise.y_candidates must have shape [C - 1, B, P, D] = [C - 1, {want[0]}, "
                                    f"{want[1]}, {want[2]}], got {list(noise.y_candidates.shape)}; draw the noise "
                                    f"with draw_noise(..., latent_candidates=C)")
        noise = noise.to(self.device)
        self.u = noise.u  # (T_x, B, L) float64
        self.initial_latents = [y.float() for y in noise.initial_latents()] if cfg.has_latent else []
        self.y_init = self.initial_latents[0] if cfg.has_latent else None
        self.known = known

    def start(self) -> torch.Tensor:
        """x at t = 1: the known tokens (runtimes.prompts), every other position masked."""
        return start_tokens(self.known, self.batch, self.cfg.seq_len, self.cfg.mask_id, self.device)

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
        raise LddmError(f"sample_{variant} needs a {variant!r} model, got variant {model.cfg.variant!r}; "
                        f"use sample_{model.cfg.variant} or sample()")


@torch.no_grad()
def sample_mdlm(model: LDDM, noise: Noise, cache: bool = False, float64: bool = True,
                callback: Callable[[Step], None] | None = None, known: torch.Tensor | None = None) -> Samples:
    """MDLM: start all masked (but the known tokens), T token steps of the denoiser.

    Args:
        model: an "mdlm" LDDM (put in eval mode here).
        noise: from make_noise(seed, B, cfg, T); T = noise.token_steps.
        cache: reuse the previous log_probs when x did not change in the previous step
            (MDLM's caching; the network is then not called).
        float64: float64 categorical draws (False: float32, faster, see the SWD benchmark).
        callback: called with a Step after every token step (y and y0_hat None; network_called
            False where the cache was used), or None.
        known: int64 [B, L] clamped tokens (runtimes.prompts: an id, or FREE where generated),
            or None; as in the runtime's Sampler.steps.
    Returns:
        Samples(tokens int64 [B, L], latent None).
    """
    _require_variant(model, "mdlm")
    model.eval()
    chain = _Chain(model, noise, float64, known)
    T = chain.token_steps
    grid = time_grid(T)
    x = chain.start()
    x_prev, log_probs = None, None
    for k in range(T):
        t, s = grid[k], grid[k + 1]
        called = not (cache and x_prev is not None and torch.equal(x, x_prev))
        if called:
            log_probs = model.denoiser(x, chain.t_tensor(t))
        x_prev = x
        x = chain.token_update(k, x, log_probs, t, s)
        if callback is not None:
            callback(Step("token", k, T, t, s, x, None, None, called))
    return Samples(x, None)


@torch.no_grad()
def sample_fuji(model: LDDM, noise: Noise, float64: bool = True,
                callback: Callable[[Step], None] | None = None, known: torch.Tensor | None = None) -> Samples:
    """FUJI: tokens and latent denoised jointly, one network call per step on one time grid.

    Args:
        model: a "fuji" LDDM.
        noise: from make_noise(seed, B, cfg, T) (holds y_init and u); T = noise.token_steps,
            token and latent steps alike.
        float64, known: as in sample_mdlm.
        callback: called with a Step after every step (y after the DDIM update, y0_hat), or None.
    Returns:
        Samples(tokens int64 [B, L], latent float32 [B, P, D] = the last y0_hat).
    """
    _require_variant(model, "fuji")
    model.eval()
    chain = _Chain(model, noise, float64, known)
    T = chain.token_steps
    grid = time_grid(T)
    x, y = chain.start(), chain.y_init
    y0_hat = None
    for k in range(T):
        t, s = grid[k], grid[k + 1]
        log_probs, y0_hat = model.denoiser(x, y, chain.t_tensor(t))
        x = chain.token_update(k, x, log_probs, t, s)
        y = chain.latent_update(y, y0_hat, t, s)
        if callback is not None:
            callback(Step("token", k, T, t, s, x, y, y0_hat))
    return Samples(x, y0_hat)


@torch.no_grad()
def sample_seq(model: LDDM, noise: Noise, latent_steps: int, float64: bool = True,
               callback: Callable[[Step], None] | None = None, known: torch.Tensor | None = None) -> Samples:
    """SEQ: a latent chain of T_y DDIM steps, then a token chain of T_x steps on the clean latent.

    Args:
        model: a "seq" LDDM.
        noise: from make_noise(seed, B, cfg, T_x); T_x = noise.token_steps. With C > 1 latent
            candidates (noise.y_candidates, runtimes.noise) each runs the latent chain, and each
            sample keeps the candidate whose y0 gives its known tokens the highest log-likelihood
            under the token network's first step (all masked, t = 1), the first on a tie.
        latent_steps: T_y (each chain on its own grid t_k = 1 - k / T).
        float64, known: as in sample_mdlm (the latent chain sees the known tokens only if the
            model's latent denoiser is prompt-aware, config.prompt_latent; candidates need them).
        callback: called with a Step after every step: the C x T_y latent steps first (phase
            "latent", x the start, y after the DDIM update, y0_hat), then the T_x token steps
            (y the clean y0, y0_hat None); or None.
    Returns:
        Samples(tokens int64 [B, L], latent float32 [B, P, D] = the latent chain's last y0_hat).
    """
    _require_variant(model, "seq")
    check_int("latent_steps", latent_steps, 1, MAX_STEPS)
    check_latent_candidates("seq", noise.latent_candidates, known)
    model.eval()
    chain = _Chain(model, noise, float64, known)
    x, C = chain.start(), noise.latent_candidates
    grid = time_grid(latent_steps)
    y0 = best = None
    for c, y in enumerate(chain.initial_latents):   # C candidates: keep the best-explaining, the first on a tie
        for j in range(latent_steps):
            t, s = grid[j], grid[j + 1]
            y0_hat = model.latent_denoiser(y, chain.t_tensor(t), x)   # x: the clamped tokens (if prompt-aware)
            y = chain.latent_update(y, y0_hat, t, s)
            if callback is not None:
                callback(Step("latent", c * latent_steps + j, C * latent_steps, t, s, x, y, y0_hat))
        if C == 1:
            y0 = y0_hat
        elif y0 is None:
            y0, best = y0_hat, _prompt_log_likelihood(model, y0_hat, chain)
        else:
            score = _prompt_log_likelihood(model, y0_hat, chain)
            y0 = torch.where((score > best)[:, None, None], y0_hat, y0)
            best = torch.maximum(score, best)
    T_x = chain.token_steps
    grid = time_grid(T_x)
    for k in range(T_x):
        t, s = grid[k], grid[k + 1]
        log_probs, _ = model.token_denoiser(x, y0, chain.t_tensor(t))
        x = chain.token_update(k, x, log_probs, t, s)
        if callback is not None:
            callback(Step("token", k, T_x, t, s, x, y0, None))
    return Samples(x, y0)


def _prompt_log_likelihood(model: LDDM, y0: torch.Tensor, chain: "_Chain") -> torch.Tensor:
    """log p(the clamped tokens | every position masked, y0, t = 1) per sample, float64 [B]: how
    well a SEQ latent candidate explains the prompt (docs/contracts.md, "Samplers")."""
    known = torch.as_tensor(chain.known).to(y0.device)
    masked = torch.full_like(known, model.cfg.mask_id)
    log_probs, _ = model.token_denoiser(masked, y0, chain.t_tensor(1.0))
    picked = log_probs.gather(-1, known.clamp_min(0)[..., None])[..., 0].double()
    return (picked * (known >= 0)).sum(-1)


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
        raise LddmError(f"sample_ar needs an 'ar' model, got variant {model.cfg.variant!r}")
    check_int("num", num, 1, MAX_SAMPLES)
    check_int("batch_size", batch_size, 1, MAX_BATCH)
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

def sample_call(model: LDDM, noise: Noise, latent_steps: int | None = None, cache: bool = False,
                float64: bool = True, callback: Callable[[Step], None] | None = None,
                known: torch.Tensor | None = None) -> Samples:
    """One sampling call of the model's variant on given noise, as the runtime's
    Sampler.sample(noise, latent_steps, callback): sample_mdlm (with `cache`), sample_fuji, or
    sample_seq with latent_steps (default: noise.token_steps).

    Raises:
        LddmError: the model is not mdlm, fuji or seq; latent_steps given for a model other than
            seq, or cache for one other than mdlm.
    """
    variant = model.cfg.variant
    if variant not in ("mdlm", "fuji", "seq"):
        raise LddmError(f"variant {variant!r} is not a diffusion model; sample() and sample_call() take "
                        f"mdlm, fuji or seq (sample_ar samples an 'ar' model)")
    if latent_steps is not None and variant != "seq":
        raise LddmError(f"latent_steps applies to seq models only; this model is {variant!r}, leave it unset")
    if cache and variant != "mdlm":
        raise LddmError(f"cache applies to mdlm models only; this model is {variant!r}, leave it off")
    if variant == "mdlm":
        return sample_mdlm(model, noise, cache=cache, float64=float64, callback=callback, known=known)
    if variant == "fuji":
        return sample_fuji(model, noise, float64=float64, callback=callback, known=known)
    return sample_seq(model, noise, latent_steps_for(variant, noise.token_steps, latent_steps),
                      float64=float64, callback=callback, known=known)


def sample(model: LDDM, seed: int, num: int, steps: int, latent_steps: int | None = None,
           batch_size: int = 256, cache: bool = False, float64: bool = True,
           callback: Callable[[int, Step], None] | None = None) -> Samples:
    """Draw `num` samples in batches of `batch_size`; batch b uses seed + b (the CLI convention),
    as the runtime's sample_batches(sampler, seed, num, steps, latent_steps, batch_size, callback).

    Args:
        model: an mdlm, fuji or seq LDDM.
        seed: the seed of batch 0.
        num: total number of samples.
        steps: token steps T_x (for fuji also the latent steps).
        latent_steps: seq only: T_y (default: steps).
        batch_size: samples per batch.
        cache: mdlm only, see sample_mdlm.
        float64: see sample_mdlm.
        callback: called as callback(b, step) after every step of batch b (progress bars).
    Returns:
        Samples(tokens int64 [num, L] on the CPU, latent float32 [num, P, D] on the CPU or None).
    Raises:
        OptionError: num, steps, batch_size or latent_steps is not an integer in its range.
        LddmError: as sample_call.
    """
    check_int("num", num, 1, MAX_SAMPLES)
    check_int("steps", steps, 1, MAX_STEPS)
    check_int("batch_size", batch_size, 1, MAX_BATCH)
    tokens, latents = [], []
    for b, (_, noise) in enumerate(batch_noises(seed, num, batch_size, steps, model.cfg.seq_len,
                                                 _latent_shape(model.cfg))):
        out = sample_call(model, noise, latent_steps, cache, float64,
                          None if callback is None else lambda step: callback(b, step))
        tokens.append(out.tokens.cpu())
        if out.latent is not None:
            latents.append(out.latent.cpu())
    return Samples(torch.cat(tokens), torch.cat(latents) if latents else None)
