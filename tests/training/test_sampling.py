"""Reference samplers: the noise protocol, the two updates, SUBS, determinism, step callbacks and errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fixtures import perturbed_model
from runtimes.errors import LddmError, ShapeMismatch
from runtimes.noise import Noise, draw_noise
from runtimes.options import OptionError
from runtimes.trajectory import Step
from training.model import LDDM
from training.sampling import (ddim_step, make_noise, sample, sample_ar, sample_call, sample_fuji, sample_mdlm,
                               sample_seq, time_grid, token_step)

L = 16


def tiny_model(variant: str, vocab_size: int = 5) -> LDDM:
    """A tiny model whose zero-initialised heads are randomised, so its outputs depend on x, y, t."""
    return perturbed_model(variant, 0.3, vocab_size=vocab_size, seq_len=L)


@pytest.fixture(scope="module", params=["mdlm", "fuji", "seq"])
def model(request):
    return tiny_model(request.param)


def run(model: LDDM, seed: int, steps: int, batch: int = 3, callback=None, latent_steps: int = 4, **kw):
    noise = make_noise(seed, batch, model.cfg, steps)
    if model.cfg.variant == "mdlm":
        return sample_mdlm(model, noise, callback=callback, **kw)
    if model.cfg.variant == "fuji":
        return sample_fuji(model, noise, callback=callback, **kw)
    return sample_seq(model, noise, latent_steps, callback=callback, **kw)


# ----------------------------------------------------------------------------- noise protocol

def test_noise_follows_the_contract_order():
    cfg = tiny_model("fuji").cfg
    noise = make_noise(7, 3, cfg, 5)
    rng = np.random.default_rng(7)
    y_init = rng.standard_normal((3, cfg.n_latent, cfg.latent_dim)).astype(np.float32)
    u = rng.random((5, 3, L))
    assert noise.y_init.dtype == np.float32 and noise.u.dtype == np.float64
    assert noise.batch == 3 and noise.token_steps == 5
    np.testing.assert_array_equal(noise.y_init, y_init)
    np.testing.assert_array_equal(noise.u, u)


def test_mdlm_noise_has_no_latent():
    noise = make_noise(7, 3, tiny_model("mdlm").cfg, 5)
    assert noise.y_init is None
    np.testing.assert_array_equal(noise.u, np.random.default_rng(7).random((5, 3, L)))


def test_time_grid_runs_from_noise_to_data():
    assert time_grid(4) == [1.0, 0.75, 0.5, 0.25, 0.0]


# ----------------------------------------------------------------------------- the updates

def test_token_step_matches_the_bridge_probabilities():
    V, mask_id, n = 4, 3, 200_000
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    log_probs = torch.log(p.clamp_min(1e-30)).expand(1, n, V).clone()
    log_probs[..., mask_id] = -1e4
    x_t = torch.full((1, n), mask_id)
    u = torch.from_numpy(np.random.default_rng(0).random((1, n)))
    alpha_t, alpha_s = 0.2, 0.6
    x_s = token_step(x_t, log_probs, u, alpha_t, alpha_s, mask_id)
    freq = torch.bincount(x_s.flatten(), minlength=V).double() / n
    expected = torch.cat([p[:3] * (alpha_s - alpha_t), torch.tensor([1 - alpha_s])]).double() / (1 - alpha_t)
    torch.testing.assert_close(freq, expected, atol=5e-3, rtol=0)


def test_token_step_keeps_unmasked_tokens_and_unmasks_all_at_s0():
    V, mask_id = 3, 2
    x_t = torch.tensor([[0, 1, 2, 2, 2]])
    log_probs = torch.log_softmax(torch.tensor([2.0, -1.0, -1e4]), -1).expand(1, 5, V)
    u = torch.tensor([[0.99, 0.99, 0.1, 0.5, 0.999]], dtype=torch.float64)
    x_s = token_step(x_t, log_probs, u, alpha_t=0.5, alpha_s=1.0, mask_id=mask_id)
    assert x_s[0, :2].tolist() == [0, 1]
    assert (x_s != mask_id).all()


def test_ddim_step_is_exact_for_a_perfect_denoiser():
    g = torch.Generator().manual_seed(0)
    y0, eps = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    a_t, a_s = 0.3, 0.8
    sig_t, sig_s = (1 - a_t ** 2) ** 0.5, (1 - a_s ** 2) ** 0.5
    y_s = ddim_step(a_t * y0 + sig_t * eps, y0, a_t, sig_t, a_s, sig_s)
    torch.testing.assert_close(y_s, a_s * y0 + sig_s * eps, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- the samplers

def test_same_seed_same_samples(model):
    a, b = run(model, 3, 4), run(model, 3, 4)
    assert torch.equal(a.tokens, b.tokens)
    if model.cfg.has_latent:
        assert torch.equal(a.latent, b.latent)


def test_different_seeds_differ(model):
    a, b = run(model, 3, 4, batch=8), run(model, 4, 4, batch=8)
    assert not torch.equal(a.tokens, b.tokens)
    if model.cfg.has_latent:
        assert not torch.allclose(a.latent, b.latent)


def test_subs_mask_never_emitted_and_unmasked_tokens_never_change(model):
    mask_id = model.cfg.mask_id
    steps = []
    out = run(model, 5, 8, batch=6, callback=steps.append)
    chain = [step.x for step in steps if step.phase == "token"]
    assert len(chain) == 8 and torch.equal(chain[-1], out.tokens)
    assert out.tokens.dtype == torch.int64 and out.tokens.shape == (6, L)
    assert (out.tokens != mask_id).all() and (out.tokens >= 0).all()
    for before, after in zip(chain, chain[1:]):
        unmasked = before != mask_id
        assert torch.equal(after[unmasked], before[unmasked])
    # With 8 steps some tokens must stay masked past step 0, so the carry-over is exercised.
    assert (chain[0] == mask_id).any()


def test_one_step_unmasks_everything(model):
    out = run(model, 0, 1, batch=5, latent_steps=1)
    assert (out.tokens != model.cfg.mask_id).all()


def test_latent_shape_and_finite(model):
    out = run(model, 1, 3, batch=4)
    cfg = model.cfg
    if not cfg.has_latent:
        assert out.latent is None
        return
    assert out.latent.dtype == torch.float32
    assert out.latent.shape == (4, cfg.n_latent, cfg.latent_dim)
    assert torch.isfinite(out.latent).all()


def test_float32_draws_give_valid_tokens(model):
    out = run(model, 2, 4, batch=4, float64=False)
    assert (out.tokens != model.cfg.mask_id).all()


def test_mdlm_cache_skips_calls_when_nothing_changed():
    model = tiny_model("mdlm")
    calls = []
    handle = model.denoiser.register_forward_hook(lambda *_: calls.append(1))
    try:
        steps = []
        sample_mdlm(model, make_noise(0, 1, model.cfg, 64), cache=True, callback=steps.append)
        chain = [torch.full((1, L), model.cfg.mask_id)] + [step.x for step in steps]  # the input of step 0 first
        # step k >= 1 reuses the cache when step k - 1 left x unchanged
        unchanged = sum(torch.equal(a, b) for a, b in zip(chain[:-2], chain[1:-1]))
        assert unchanged > 0
        assert len(calls) == 64 - unchanged
        assert [step.network_called for step in steps].count(False) == unchanged
        calls.clear()
        sample_mdlm(model, make_noise(0, 1, model.cfg, 64), cache=False)
        assert len(calls) == 64
    finally:
        handle.remove()


def test_sample_batches_with_seed_plus_b():
    model = tiny_model("seq")
    seen = []
    out = sample(model, seed=10, num=5, steps=2, latent_steps=3, batch_size=2,
                 callback=lambda b, step: seen.append((b, step.phase, step.index)))
    parts = [sample_seq(model, make_noise(10 + b, n, model.cfg, 2), 3) for b, n in enumerate([2, 2, 1])]
    assert torch.equal(out.tokens, torch.cat([p.tokens for p in parts]))
    assert torch.equal(out.latent, torch.cat([p.latent for p in parts]))
    chain = [("latent", j) for j in range(3)] + [("token", k) for k in range(2)]
    assert seen == [(b, *step) for b in range(3) for step in chain]


def test_callback_steps_carry_the_runtime_fields(model):
    """Every chain's steps, as runtimes.samplers.Sampler.steps() yields them (runtimes/trajectory.py)."""
    steps = []
    out = run(model, 6, 3, batch=2, callback=steps.append, latent_steps=2)
    assert all(isinstance(step, Step) for step in steps)
    variant, mask_id = model.cfg.variant, model.cfg.mask_id
    assert [step.phase for step in steps] == ["latent"] * (2 if variant == "seq" else 0) + ["token"] * 3
    latent, tokens = steps[:-3], steps[-3:]
    for chain, total in ((latent, 2), (tokens, 3)):
        assert [(s.index, s.total, s.t, s.s) for s in chain] == [(k, total, *time_grid(total)[k:k + 2])
                                                                for k in range(len(chain))]
    assert torch.equal(tokens[-1].x, out.tokens)
    assert all(step.network_called for step in steps)
    if variant == "mdlm":
        assert all(step.y is None and step.y0_hat is None for step in steps)
    elif variant == "fuji":
        assert torch.equal(tokens[-1].y0_hat, out.latent) and all(step.y is not None for step in tokens)
        assert not torch.equal(tokens[0].y, tokens[0].y0_hat)  # y after the DDIM update, not the estimate
    else:
        assert all((step.x == mask_id).all() and step.y0_hat is not None for step in latent)
        assert torch.equal(latent[-1].y0_hat, out.latent)
        assert all(torch.equal(step.y, out.latent) and step.y0_hat is None for step in tokens)


def test_sample_call_picks_the_variant_sampler(model):
    noise = make_noise(8, 2, model.cfg, 3)
    latent_steps = 2 if model.cfg.variant == "seq" else None
    ours = sample_call(model, noise, latent_steps)
    direct = run(model, 8, 3, batch=2, latent_steps=2)
    assert torch.equal(ours.tokens, direct.tokens)


def test_torch_noise_gives_the_numpy_noise_samples(model):
    noise = make_noise(9, 2, model.cfg, 3)
    as_torch = Noise(torch.from_numpy(noise.u), None if noise.y_init is None else torch.from_numpy(noise.y_init))
    assert torch.equal(sample_call(model, as_torch).tokens, sample_call(model, noise).tokens)


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, error, match", [
    (dict(steps=0), OptionError, "steps must be a positive integer"),
    (dict(steps=2, num=-1), OptionError, "num must be a positive integer"),
    (dict(steps=2, batch_size=0), OptionError, "batch_size must be a positive integer"),
    (dict(steps=2, latent_steps=2), LddmError, "latent_steps applies to seq models only"),
    (dict(steps=2, cache=True), None, None),
])
def test_sample_rejects_bad_arguments(kwargs, error, match):
    args = dict(seed=0, num=2) | kwargs
    model = tiny_model("mdlm")
    if match is None:  # cache is valid for mdlm
        assert sample(model, **args).tokens.shape == (2, L)
        with pytest.raises(LddmError, match="cache applies to mdlm models only"):
            sample(tiny_model("fuji"), **args)
        return
    with pytest.raises(error, match=match):
        sample(model, **args)


def test_sampler_rejects_wrong_variant_and_mismatched_noise():
    fuji = tiny_model("fuji")
    with pytest.raises(LddmError, match="sample_mdlm needs a 'mdlm' model"):
        sample_mdlm(fuji, make_noise(0, 2, fuji.cfg, 2))
    with pytest.raises(ShapeMismatch, match=r"noise.u must have shape .* draw the noise with make_noise"):
        sample_mdlm(tiny_model("mdlm"), draw_noise(0, 2, 2, L + 1))
    with pytest.raises(ShapeMismatch, match=r"noise.y_init must have shape .* make_noise"):
        sample_fuji(fuji, make_noise(0, 2, tiny_model("mdlm").cfg, 2))
    with pytest.raises(OptionError, match="latent_steps must be a positive integer"):
        sample_seq(tiny_model("seq"), make_noise(0, 2, fuji.cfg, 2), 0)
    with pytest.raises(OptionError, match="token_steps must be a positive integer"):
        make_noise(0, 2, fuji.cfg, 0)
    with pytest.raises(LddmError, match="not a diffusion model"):
        sample(tiny_model("ar"), 0, 2, 2)
    with pytest.raises(LddmError, match="sample_ar needs an 'ar' model"):
        sample_ar(fuji, 0, 2)
    with pytest.raises(OptionError, match="num must be a positive integer"):
        sample_ar(tiny_model("ar"), 0, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["mdlm", "fuji", "seq"])
def test_cuda_sampler_agrees_with_cpu(variant):
    """Same draws on CPU and CUDA: the arithmetic runs on the model's device, the tokens agree."""
    model = tiny_model(variant)
    cpu = run(model, 11, 8, batch=8)
    gpu = run(model.cuda(), 11, 8, batch=8)
    model.cpu()
    assert gpu.tokens.device.type == "cuda"
    assert (gpu.tokens.cpu() == cpu.tokens).double().mean() > 0.95
    if model.cfg.has_latent:
        torch.testing.assert_close(gpu.latent.cpu(), cpu.latent, atol=1e-3, rtol=1e-3)


# ----------------------------------------------------------------------------- the AR evaluator's sampler

def test_ar_samples_are_the_inverse_cdf_draws_of_the_model_conditionals():
    model = tiny_model("ar")
    tokens = sample_ar(model, seed=7, num=5, batch_size=3)  # two batches: seeds 7 and 8
    assert tokens.shape == (5, L) and tokens.max() < model.cfg.vocab_size
    for b, rows in enumerate((tokens[:3], tokens[3:])):
        u = np.random.default_rng(7 + b).random((L, len(rows)))
        bos = torch.full((len(rows), 1), model.cfg.mask_id)
        with torch.no_grad():  # one teacher-forced pass gives every conditional of the drawn sequence
            probs = model.denoiser(torch.cat([bos, rows[:, :-1]], 1), torch.zeros(len(rows))).double().exp()
        cdf = probs.cumsum(-1)  # (B, L, V)
        lower = torch.cat([torch.zeros_like(cdf[..., :1]), cdf[..., :-1]], -1).gather(-1, rows[..., None])[..., 0]
        upper = cdf.gather(-1, rows[..., None])[..., 0]
        target = torch.from_numpy(u.T) * cdf[..., -1]
        assert bool(((lower < target) & (target <= upper)).all())
    assert torch.equal(sample_ar(model, seed=7, num=5, batch_size=3), tokens)
