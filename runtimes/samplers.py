"""The MDLM, FUJI and SEQ sampling loops, written once against the Runner interface.

A sampler owns the schedule, the noise and the loop; the graphs are pure functions behind
runners (runtimes/base.py), so the same loop runs on the torch reference, ONNX Runtime and
TensorRT, and two backends fed the same Noise can be compared token by token.

The arithmetic follows docs/contracts.md exactly (it is what training/sampling.py computes):
- time grid t_k = 1 - k / T; step k evaluates the network at t = t_k and moves to s = t_{k+1};
- token step: the MDLM bridge with SUBS carry-over, the categorical draw in float64 by default
  (`float64_draws=False` trades it for float32, see RESULTS.md for its effect);
- latent step: DDIM with eta = 0; the final latent is the last y0_hat.

The sampler speaks the reference sampler's dialect: it takes a Noise, reports every step as a
runtimes.trajectory.Step to its callback, returns runtimes.trajectory.Samples and raises LddmErrors.

Every tensor op runs on the runners' device: the noise is copied there once, up front, and no
[B, L, V] tensor ever returns to the host, so on a GPU the loop only launches kernels.

Step-by-step use (progress bars, streaming):

    sampler = Sampler.from_bundle(bundle, runners)
    for step in sampler.steps(noise, latent_steps=8):
        print(step.phase, step.index, step.total)
    result = sampler.sample(noise, latent_steps=8)      # the same loop, run to the end
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from runtimes.base import Runner
from runtimes.errors import LddmError, ShapeMismatch
from runtimes.noise import Noise, batch_noises, check_latent_candidates, latent_shape
from runtimes.prompts import start_tokens
from runtimes.schedules import LatentSchedule, MaskSchedule, from_manifest, time_grid
from runtimes.spec import CLAMPED, GRAPHS_BY_VARIANT, HEADS
from runtimes.trajectory import Samples, Step

# The rows a sparse step gathers: u below the unmask probability times (1 + ROW_MARGIN). The
# draw on them decides (unmasking_rows), so the margin only has to exceed the rounding of a
# row's probability mass off the mask, |S - 1|: a float32 log-softmax is normalised to about
# 1e-6 (its entropy in nats times float32's 6e-8 per element), far inside 1e-3.
ROW_MARGIN = 1e-3

# The CPU draw's block (draw_block_rows): the passes over a block of the CDF (cast, exp, scale,
# cumsum, search) stay in a core's L2 cache instead of each streaming [N, V] float64 through
# memory, and its buffer is allocated once per draw: on one thread 1024 rows of V = 32768 take
# 72 ms in 1 MiB blocks instead of 480 ms as four fresh [N, V] tensors.
DRAW_BLOCK_BYTES = 1 << 20


def sampler_graphs(variant: str, head: str = "sparse") -> tuple[str, ...]:
    """The graphs a sampling loop calls: SEQ's latent denoiser, then the token network, dense
    (the denoiser, or SEQ's token_denoiser) or sparse (the trunk and the head)."""
    if variant not in GRAPHS_BY_VARIANT:
        raise LddmError(f"variant {variant!r} has no sampler; expected one of {sorted(GRAPHS_BY_VARIANT)}")
    if head not in HEADS:
        raise LddmError(f"head {head!r} is unknown; choose one of {', '.join(HEADS)}")
    latent = ("latent_denoiser",) if variant == "seq" else ()
    if head == "sparse":
        return latent + ("trunk", "head")
    return latent + (("token_denoiser",) if variant == "seq" else ("denoiser",))


def token_step(x_t: torch.Tensor, log_probs: torch.Tensor, u: torch.Tensor, alpha_t: float,
               alpha_s: float, mask_id: int, float64: bool = True) -> torch.Tensor:
    """One MDLM bridge step from t to s with SUBS carry-over (docs/contracts.md).

    Args:
        x_t: int64 [B, L] tokens at time t.
        log_probs: float32 [B, L, V] log p(x0 | x_t), the mask column a large finite negative.
        u: uniforms [B, L] (float64) for this step's categorical draws.
        alpha_t, alpha_s: the masking schedule at t and s (Python floats, alpha_s >= alpha_t).
        mask_id: the mask token's id (V - 1).
        float64: draw in float64 (the paper, the default) or in float32 (faster).
    Returns:
        int64 [B, L] tokens at time s: masked tokens unmasked or kept masked by the draw,
        unmasked tokens carried over unchanged.
    """
    return bridge_draw(x_t, log_probs, u, alpha_s - alpha_t, 1 - alpha_s, mask_id, float64,
                       draw_block_rows(log_probs, float64))


def draw_block_rows(log_probs: torch.Tensor, float64: bool = True) -> int | None:
    """How many rows bridge_tokens draws at a time: on the CPU as many as fill DRAW_BLOCK_BYTES
    of the CDF, elsewhere (one kernel per pass is what counts there) all of them (None)."""
    if log_probs.device.type != "cpu":
        return None
    return max(1, DRAW_BLOCK_BYTES // (log_probs.shape[-1] * (8 if float64 else 4)))


def bridge_draw(x_t: torch.Tensor, log_probs: torch.Tensor, u: torch.Tensor, unmask_weight, stay_weight,
                mask_id: int, float64: bool = True, block_rows: int | None = None) -> torch.Tensor:
    """token_step with the bridge's two weights given directly: unmask_weight = alpha_s - alpha_t
    (to token v, times p(v)), stay_weight = 1 - alpha_s (stay masked). Python floats, or 0-d
    float64 tensors on the device: the form torch.compile takes without recompiling every step.
    block_rows: as for bridge_tokens.
    """
    x_new = bridge_tokens(log_probs.reshape(-1, log_probs.shape[-1]), u.reshape(-1), unmask_weight, stay_weight,
                          mask_id, float64, block_rows)
    return torch.where(x_t == mask_id, x_new.view_as(x_t), x_t)


def bridge_tokens(log_probs: torch.Tensor, u: torch.Tensor, unmask_weight, stay_weight, mask_id: int,
                  float64: bool = True, block_rows: int | None = None) -> torch.Tensor:
    """The bridge's draw at N positions as if each were masked (no carry-over).

    Args:
        log_probs: float32 [N, V]; u: uniforms [N]; the rest as for bridge_draw.
        block_rows: rows drawn at a time (None: all at once). Blocks go through one reused
            CDF buffer; each row's arithmetic is the contract's, in its order, whatever the blocks.
    Returns:
        int64 [N] tokens (the mask_id where a position stays masked).
    """
    dtype = torch.float64 if float64 else torch.float32
    if block_rows is None or log_probs.shape[0] <= block_rows:
        return draw_rows(log_probs, u, unmask_weight, stay_weight, mask_id, dtype)
    cdf_buffer = torch.empty((block_rows, log_probs.shape[1]), dtype=dtype, device=log_probs.device)
    return torch.cat([draw_rows(rows, uniforms, unmask_weight, stay_weight, mask_id, dtype, cdf_buffer[:len(rows)])
                      for rows, uniforms in zip(log_probs.split(block_rows), u.split(block_rows))])


def draw_rows(log_probs: torch.Tensor, u: torch.Tensor, unmask_weight, stay_weight, mask_id: int,
              dtype: torch.dtype, cdf: torch.Tensor | None = None) -> torch.Tensor:
    """The contract's draw on rows [n, V] of log_probs with uniforms u [n], computed in `cdf`
    ([n, V] of dtype) or in a new tensor (None): int64 [n] tokens."""
    # Every pass in place on one tensor, a copy (the caller's log_probs stay as they are).
    cdf = log_probs.to(dtype, copy=True) if cdf is None else cdf.copy_(log_probs)
    cdf.exp_().mul_(unmask_weight)
    cdf.select(1, mask_id).fill_(stay_weight)
    cdf.cumsum_(1)
    # Dividing by 1 - alpha_t normalises the CDF; it is folded into the scaled uniform instead.
    target = u.unsqueeze(1).to(dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, target).clamp_max_(log_probs.shape[1] - 1).squeeze(1)


def unmasking_rows(x_t: torch.Tensor, u: torch.Tensor, alpha_t: float, alpha_s: float, mask_id: int) -> torch.Tensor:
    """The positions that can leave the mask from t to s, as flat indices into [B * L].

    The network does not decide whether a masked position unmasks: the mask is the last bin
    of the bridge's CDF, so position i unmasks when u_i <= (alpha_s - alpha_t) S_i /
    ((alpha_s - alpha_t) S_i + 1 - alpha_s), with S_i its probability mass off the mask, which
    is 1 up to rounding: u_i <= (alpha_s - alpha_t) / (1 - alpha_t). The rows returned are the
    masked ones with u_i below that times (1 + ROW_MARGIN); sparse_token_step draws on them
    exactly as token_step does, so a row inside the margin may stay masked, and the tokens are
    token_step's whenever |S_i - 1| < ROW_MARGIN.

    Returns:
        int64 [N] (N may be 0); reading N back is the one device-to-host sync of a sparse step.
    """
    unmask = (alpha_s - alpha_t) / (1 - alpha_t) * (1 + ROW_MARGIN)
    return ((x_t == mask_id) & (u < unmask)).flatten().nonzero().squeeze(1)


def sparse_token_step(x_t: torch.Tensor, rows: torch.Tensor, row_log_probs: torch.Tensor, u: torch.Tensor,
                      alpha_t: float, alpha_s: float, mask_id: int, float64: bool = True) -> torch.Tensor:
    """token_step with log-probs only at `rows` (unmasking_rows): the same draw there, every
    other position carried over (a masked one stays masked).

    Args:
        x_t: int64 [B, L]; rows: int64 [N] flat indices of masked positions (unmasking_rows);
            row_log_probs: float32 [N, V], the head at those rows; u: uniforms [B, L]; the rest
            as for token_step.
    Returns:
        int64 [B, L] tokens at time s (a new tensor).
    """
    # The rows are masked positions, so each one's token is the draw (nothing to carry over).
    drawn = bridge_tokens(row_log_probs, u.take(rows), alpha_s - alpha_t, 1 - alpha_s, mask_id, float64,
                          draw_block_rows(row_log_probs, float64))
    return x_t.put(rows, drawn)


def ddim_step(y_t: torch.Tensor, y0_hat: torch.Tensor, alpha_sigma_t: tuple[float, float],
              alpha_sigma_s: tuple[float, float]) -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from t to s: float32 [B, P, D] tensors, float64 scalars."""
    (a_t, sig_t), (a_s, sig_s) = alpha_sigma_t, alpha_sigma_s
    eps_hat = (y_t - a_t * y0_hat) / sig_t
    return a_s * y0_hat + sig_s * eps_hat


class Sampler:
    """The sampling loop of one variant around that variant's runners.

    Args:
        variant: "mdlm", "fuji" or "seq".
        runners: graph name -> active Runner, all on the same device: at least
            sampler_graphs(variant, head).
        shapes: {"L", "P", "D", "V", "W", "mask_id"} as in the manifest.
        mask_schedule, latent_schedule: the schedules (latent None for mdlm).
        float64_draws: categorical draws in float64 (default, as the paper) or float32.
        head: "sparse" (default): each token step runs the trunk, then the head only at the rows
            that unmask (unmasking_rows), and a step where none does runs no graph (MDLM, SEQ's
            token chain) or the trunk alone (FUJI, for y0_hat). "dense": the token graph's
            log-probs at every position (the reference form, what verify compares against).
            Both give the same tokens but where a uniform is within rounding of a CDF boundary.
        cache: MDLM only: the network's output (dense: log_probs, sparse: the trunk's hidden
            state) is reused while the tokens do not change, evaluated at the time of the first
            step since they last changed (MDLM's caching); costs one device-to-host sync per step.
        pad_rows: pad the head's rows to a power of two (the padding repeats a row, and its
            outputs are dropped), so that runners that replay captured CUDA graphs see a few
            shapes; None: on CUDA devices.
        compile: run the dense token step through torch.compile: its ~10 passes over [B, L, V]
            (cast, exp, scale, cumsum, search) fuse into a few kernels, which matters on a GPU
            once the graphs are fast (on an H100 at B = 64, V = 8193 the time outside the
            graph fell from 1.6 to 0.6 ms per step, RESULTS.md).
            The two bridge weights of each step then live on the device (copied once per chain
            length). Draws equal the eager ones except where a uniform falls within rounding of
            a CDF boundary.
    """

    def __init__(self, variant: str, runners: dict[str, Runner], shapes: dict,
                 mask_schedule: MaskSchedule, latent_schedule: LatentSchedule | None,
                 float64_draws: bool = True, head: str = "sparse", cache: bool = False,
                 pad_rows: bool | None = None, compile: bool = False):
        graphs = sampler_graphs(variant, head)
        missing = [g for g in graphs if g not in runners]
        if missing:
            raise LddmError(f"the {variant} sampler with the {head} head needs runners for {list(graphs)}, "
                            f"missing {missing}")
        if variant != "mdlm" and latent_schedule is None:
            raise LddmError(f"the {variant} sampler needs a latent schedule; the manifest has none")
        if cache and variant != "mdlm":
            raise LddmError(f"caching applies to the mdlm sampler only, not to {variant}")
        self.variant, self.runners, self.shapes = variant, runners, shapes
        self.mask_schedule, self.latent_schedule = mask_schedule, latent_schedule
        self.float64_draws, self.head, self.cache = float64_draws, head, cache
        self.device = runners[graphs[0]].device
        # A prompt-aware SEQ latent denoiser (config.prompt_latent) also takes the clamped tokens.
        self.prompt_latent = variant == "seq" and CLAMPED in runners["latent_denoiser"].spec.input_names
        self.pad_rows = self.device.type == "cuda" if pad_rows is None else pad_rows
        self._compiled_draw = torch.compile(bridge_draw, fullgraph=True, dynamic=False) if compile else None
        self._device_weights: dict[tuple[float, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_bundle(cls, bundle, runners: dict[str, Runner], **options) -> "Sampler":
        """A sampler with the bundle's variant, shapes and schedule constants (manifest)."""
        mask, latent = from_manifest(bundle.schedule)
        return cls(bundle.variant, runners, bundle.shapes, mask, latent, **options)

    # ----------------------------------------------------------------------------- public API

    def steps(self, noise: Noise, latent_steps: int | None = None,
              known: torch.Tensor | None = None) -> Iterator[Step]:
        """Run the loop, yielding the state after every step (the last one holds the result).

        Args:
            noise: the call's draws (runtimes.noise.draw_noise); T_x = noise.token_steps.
            latent_steps: T_y, SEQ's latent-chain length (required for seq, ignored otherwise).
            known: int64 [B, L], the clamped tokens (runtimes.prompts: an id, or FREE where the
                sampler generates), or None: every position generated. Clamped positions start
                unmasked and are carried over; SEQ's latent chain sees them only through a
                prompt-aware latent denoiser (its "clamped" input: x at t = 1).
        Yields:
            Step after every step: SEQ's T_y latent steps first, then T_x token steps.
            Tensors are on self.device and are not reused by the sampler (safe to keep).
        """
        if self.variant == "seq" and (latent_steps is None or latent_steps < 1):
            raise LddmError(f"seq sampling needs latent_steps >= 1, got {latent_steps}")
        if self.variant != "mdlm" and noise.y_init is None:
            raise ShapeMismatch(f"{self.variant} sampling needs noise with y_init; draw it with latent_shape=(P, D)")
        L, P, D = self.shapes["L"], self.shapes["P"], self.shapes["D"]
        if noise.token_steps < 1 or tuple(noise.u.shape[1:]) != (noise.batch, L):
            raise ShapeMismatch(f"noise u must have shape [T_x >= 1, B, L = {L}], got {list(noise.u.shape)}; "
                                f"draw it with draw_noise(seed, B, T_x, {L}, ...)")
        if noise.y_init is not None and self.variant != "mdlm" and tuple(noise.y_init.shape) != (noise.batch, P, D):
            raise ShapeMismatch(f"noise y_init must have shape [B, P, D] = {[noise.batch, P, D]}, "
                                f"got {list(noise.y_init.shape)}")
        if noise.latent_candidates > 1:
            check_latent_candidates(self.variant, noise.latent_candidates, known)
            if tuple(noise.y_candidates.shape) != (noise.latent_candidates - 1, noise.batch, P, D):
                raise ShapeMismatch(f"noise y_candidates must have shape [C - 1, B, P, D], got "
                                    f"{list(noise.y_candidates.shape)}; draw it with draw_noise(..., latent_candidates=C)")
        x = start_tokens(known, noise.batch, L, self.shapes["mask_id"], self.device)
        noise = noise.to(self.device)
        if self.variant == "mdlm":
            return self._mdlm(noise, x)
        if self.variant == "fuji":
            return self._fuji(noise, x)
        return self._seq(noise, latent_steps, x, None if known is None else known.to(self.device))

    def sample(self, noise: Noise, latent_steps: int | None = None,
               callback: Callable[[Step], None] | None = None, known: torch.Tensor | None = None) -> Samples:
        """Run the loop to the end.

        Args:
            noise, latent_steps, known: as for steps().
            callback: called with every Step (progress, streaming), or None.
        Returns:
            Samples: tokens int64 [B, L]; latent float32 [B, P, D] (fuji, seq) or None.
        """
        last = None
        for last in self.steps(noise, latent_steps, known):
            if callback is not None:
                callback(last)
        latent = last.y0_hat if self.variant == "fuji" else last.y
        return Samples(last.x, latent)

    # ----------------------------------------------------------------------------- the loops

    def _t(self, t: float, batch: int) -> torch.Tensor:
        return torch.full((batch,), t, dtype=torch.float32, device=self.device)

    def _token_chain(self, steps: int):
        """The grid and the masking alphas on it (host-side floats)."""
        return time_grid(steps), self.mask_schedule.on_grid(steps)

    def _latent_chain(self, steps: int):
        return time_grid(steps), self.latent_schedule.on_grid(steps)

    def _token_step(self, x, log_probs, u, alphas, k):
        if self._compiled_draw is None:
            return token_step(x, log_probs, u, alphas[k], alphas[k + 1], self.shapes["mask_id"], self.float64_draws)
        unmask, stay = self._weights_on_device(alphas)
        return self._compiled_draw(x, log_probs, u, unmask[k], stay[k], self.shapes["mask_id"], self.float64_draws)

    def _weights_on_device(self, alphas: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """Every step's (alpha_s - alpha_t, 1 - alpha_s) of one chain, float64 on the device, cached."""
        key = tuple(alphas)
        if key not in self._device_weights:
            unmask = [a_s - a_t for a_t, a_s in zip(alphas, alphas[1:])]
            stay = [1 - a_s for a_s in alphas[1:]]
            self._device_weights[key] = (torch.tensor(unmask, dtype=torch.float64, device=self.device),
                                         torch.tensor(stay, dtype=torch.float64, device=self.device))
        return self._device_weights[key]

    def _rows(self, x, u, alphas, k) -> torch.Tensor:
        return unmasking_rows(x, u, alphas[k], alphas[k + 1], self.shapes["mask_id"])

    def _head_rows(self, hidden, rows) -> torch.Tensor:
        """The head's log_probs [N, V] at `rows` (flat indices) of the trunk's hidden [B, L, W]."""
        flat, n = hidden.reshape(-1, hidden.shape[-1]), rows.numel()
        gather = rows
        if self.pad_rows:
            gather = torch.cat([rows, rows[:1].expand(min(1 << (n - 1).bit_length(), flat.shape[0]) - n)])
        return self.runners["head"].infer({"hidden": flat.index_select(0, gather)})["log_probs"][:n]

    def _sparse_step(self, x, hidden, rows, u, alphas, k) -> torch.Tensor:
        """The head at `rows` of the trunk's hidden [B, L, W], and the draw there."""
        return sparse_token_step(x, rows, self._head_rows(hidden, rows), u, alphas[k], alphas[k + 1],
                                 self.shapes["mask_id"], self.float64_draws)

    def _prompt_log_likelihood(self, y0: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """log p(the clamped tokens | every position masked, y0, t = 1) per sample, float64 [B]:
        how well a SEQ latent explains the prompt, by the token network's first step."""
        B, L = known.shape
        feed = {"x_t": torch.full_like(known, self.shapes["mask_id"]), "y0": y0, "t": self._t(1.0, B)}
        rows = (known >= 0).flatten().nonzero().squeeze(1)
        if rows.numel() == 0:   # nothing clamped: every candidate explains it alike
            return torch.zeros(B, dtype=torch.float64, device=self.device)
        if self.head == "dense":
            log_probs = self.runners["token_denoiser"].infer(feed)["log_probs"].reshape(B * L, -1)[rows]
        else:
            log_probs = self._head_rows(self.runners["trunk"].infer(feed)["hidden"], rows)
        picked = log_probs.gather(1, known.flatten()[rows, None])[:, 0].double()
        return torch.zeros(B, dtype=torch.float64, device=self.device).index_add_(0, rows // L, picked)

    def _token_update(self, k, x, feed, u, alphas, trunk_always: bool = False):
        """One token step of FUJI or SEQ from the token network's feed.

        Returns:
            (x_s, the token graph's outputs or None when no graph ran, whether one ran).
            trunk_always: run the trunk even when no position unmasks (FUJI needs its y0_hat).
        """
        if self.head == "dense":
            out = self.runners["token_denoiser" if self.variant == "seq" else "denoiser"].infer(feed)
            return self._token_step(x, out["log_probs"], u, alphas, k), out, True
        rows = self._rows(x, u, alphas, k)
        if rows.numel() == 0 and not trunk_always:
            return x, None, False
        out = self.runners["trunk"].infer(feed)
        return (self._sparse_step(x, out["hidden"], rows, u, alphas, k) if rows.numel() else x), out, True

    def _mdlm(self, noise: Noise, x: torch.Tensor) -> Iterator[Step]:
        """MDLM; with the cache, the network output `kept` was computed at grid[fresh], the first
        step since the tokens last changed (without it, fresh is always this step)."""
        B, T = noise.batch, noise.token_steps
        grid, alphas = self._token_chain(T)
        fresh, kept = 0, None
        for k in range(T):
            if not self.cache:
                fresh, kept = k, None
            feed = {"x_t": x, "t": self._t(grid[fresh], B)}
            if self.head == "dense":
                called = kept is None
                kept = self.runners["denoiser"].infer(feed)["log_probs"] if called else kept
                x_s = self._token_step(x, kept, noise.u[k], alphas, k)
            else:
                rows = self._rows(x, noise.u[k], alphas, k)
                called = rows.numel() > 0
                if called and kept is None:
                    kept = self.runners["trunk"].infer(feed)["hidden"]
                x_s = self._sparse_step(x, kept, rows, noise.u[k], alphas, k) if called else x
            if self.cache and not torch.equal(x_s, x):
                fresh, kept = k + 1, None
            x = x_s
            yield Step("token", k, T, grid[k], grid[k + 1], x, None, None, called)

    def _fuji(self, noise: Noise, x: torch.Tensor) -> Iterator[Step]:
        B, T = noise.batch, noise.token_steps
        (grid, alphas), (_, alpha_sigmas) = self._token_chain(T), self._latent_chain(T)
        y = noise.y_init
        for k in range(T):
            feed = {"x_t": x, "y_t": y, "t": self._t(grid[k], B)}
            x, out, _ = self._token_update(k, x, feed, noise.u[k], alphas, trunk_always=True)
            y0_hat = out["y0_hat"].clone()  # a runner may reuse its output buffer next call
            y = ddim_step(y, y0_hat, alpha_sigmas[k], alpha_sigmas[k + 1])
            yield Step("token", k, T, grid[k], grid[k + 1], x, y, y0_hat)

    def _seq(self, noise: Noise, latent_steps: int, x: torch.Tensor, known: torch.Tensor | None) -> Iterator[Step]:
        """SEQ: the latent chain (for each of C candidates, keeping the one whose latent best
        explains the clamped tokens, the first on a tie), then the token chain on its y0."""
        B, T_x, T_y, C = noise.batch, noise.token_steps, latent_steps, noise.latent_candidates
        latent_denoiser = self.runners["latent_denoiser"]
        (grid, alpha_sigmas), y0, best = self._latent_chain(T_y), None, None
        for c, y in enumerate(noise.initial_latents()):
            for j in range(T_y):
                feed = {"y_t": y, "t": self._t(grid[j], B), **({CLAMPED: x} if self.prompt_latent else {})}
                y0_hat = latent_denoiser.infer(feed)["y0_hat"].clone()
                y = ddim_step(y, y0_hat, alpha_sigmas[j], alpha_sigmas[j + 1])
                yield Step("latent", c * T_y + j, C * T_y, grid[j], grid[j + 1], x, y, y0_hat)
            if C == 1:
                y0 = y0_hat
            elif y0 is None:
                y0, best = y0_hat, self._prompt_log_likelihood(y0_hat, known)
            else:
                score = self._prompt_log_likelihood(y0_hat, known)
                y0 = torch.where((score > best)[:, None, None], y0_hat, y0)
                best = torch.maximum(score, best)
        grid, alphas = self._token_chain(T_x)
        for k in range(T_x):
            x, _, called = self._token_update(k, x, {"x_t": x, "y0": y0, "t": self._t(grid[k], B)}, noise.u[k], alphas)
            yield Step("token", k, T_x, grid[k], grid[k + 1], x, y0, None, called)


def sample_batches(sampler: Sampler, seed: int, num: int, steps: int, latent_steps: int | None = None,
                   batch_size: int = 256, callback: Callable[[int, Step], None] | None = None,
                   known: torch.Tensor | None = None, latent_candidates: int = 1) -> Samples:
    """Draw `num` samples in batches; batch b uses seed + b (docs/contracts.md, the CLI convention).

    Args:
        sampler: a Sampler whose runners are active.
        seed: the seed of batch 0.
        num: K, the number of samples.
        steps: T_x, token steps; latent_steps: T_y (seq only).
        batch_size: B, samples per call (the last may be smaller).
        callback: called as callback(b, step) after every step of batch b (progress bars).
        known: int64 [K, L] clamped tokens (Sampler.steps), or None.
        latent_candidates: C, SEQ's latent chains per sample, the one that best explains `known` kept.
    Returns:
        Samples on the CPU: tokens int64 [K, L]; latent float32 [K, P, D] or None.
    """
    shapes = sampler.shapes
    tokens, latents = [], []
    for b, (start, noise) in enumerate(batch_noises(seed, num, batch_size, steps, shapes["L"],
                                                     latent_shape(sampler.variant, shapes), latent_candidates)):
        result = sampler.sample(noise, latent_steps, None if callback is None else lambda step: callback(b, step),
                                None if known is None else known[start:start + noise.batch])
        tokens.append(result.tokens.cpu())
        if result.latent is not None:
            latents.append(result.latent.cpu())
    return Samples(torch.cat(tokens), torch.cat(latents) if latents else None)
