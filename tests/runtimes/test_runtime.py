"""The runtime: noise and schedules as the contract says, samplers vs the reference, backends.

Trajectory parity has two levels here:
- the runtime sampler on the torch backend reproduces training/sampling.py token for token
  (and the latent bit for bit): same modules, same draws, same arithmetic;
- on ONNX Runtime (FP32) it agrees with the reference in >= 99.9% of the tokens of every step,
  and the per-step latent error is reported (`-s` prints it; it is also a junit property).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures import built_example_bundle, cached_tiny_bundle, copy_bundle
from runtimes.backends import make_runners
from runtimes.bundle import Bundle
from runtimes.compare import compare_outputs
from runtimes.errors import BackendUnavailable, BundleError, LddmError, ShapeMismatch
from runtimes.noise import draw_noise, latent_shape
from runtimes.samplers import Sampler, bridge_draw, ddim_step, sample_batches, token_step
from runtimes.schedules import LatentSchedule, MaskSchedule
from runtimes.tokenizer import TextDecoder
from runtimes.tolerances import graph_tolerances
from training import sampling
from training import schedules as ref_schedules
from training.checkpoint import load_checkpoint, load_reference_graphs

VARIANTS = ("mdlm", "fuji", "seq")
B, T_X, T_Y = 16, 6, 4
TOKEN_AGREEMENT = 0.999
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SWD_SAMPLES, SWD_BATCH, SWD_STEPS, SWD_MARGIN = 1000, 64, 4, 0.05
LATENT_ATOL = 1e-3  # max abs error of y0_hat per step (values are O(1)), ORT FP32 vs torch


@pytest.fixture(scope="module", params=VARIANTS)
def bundle(request, bundle_cache):  # noqa: F811
    return Bundle.open(cached_tiny_bundle(bundle_cache, request.param))


def active_sampler(bundle, backend, precision="fp32", **options):
    runners = make_runners(bundle, backend, precision, "cpu", threads=1, reference=load_reference_graphs)
    for runner in runners.values():
        runner.activate()
    return Sampler.from_bundle(bundle, runners, **options)


def noise_for(bundle, seed, batch=B, steps=T_X):
    s = bundle.shapes
    return draw_noise(seed, batch, steps, s["L"], latent_shape(bundle.variant, s))


@functools.lru_cache(maxsize=None)
def reference_model(path: str):
    return load_checkpoint(path)[0]


def reference(bundle, seed, batch=B, steps=T_X, **options):
    model = reference_model(bundle.manifest["checkpoint"]["path"])
    return sampling.sample_call(model, sampling.make_noise(seed, batch, model.cfg, steps), latent_steps(bundle),
                                **options)


def latent_steps(bundle):
    return T_Y if bundle.variant == "seq" else None


# ----------------------------------------------------------------------------- contract pieces

@pytest.mark.parametrize("variant", VARIANTS)
def test_noise_matches_the_reference_noise(variant):
    from fixtures import tiny_config
    cfg = tiny_config(variant)
    noise = draw_noise(7, 3, 5, cfg.seq_len, (cfg.n_latent, cfg.latent_dim) if cfg.has_latent else None)
    ref = sampling.make_noise(7, 3, cfg, 5)
    assert noise.u.dtype == np.float64 and noise.u.shape == (5, 3, cfg.seq_len)
    np.testing.assert_array_equal(noise.u, ref.u)
    if cfg.has_latent:
        assert noise.y_init.dtype == np.float32
        np.testing.assert_array_equal(noise.y_init, ref.y_init)
    else:
        assert noise.y_init is None and ref.y_init is None


@pytest.mark.parametrize("kind,eps", [("linear", 0.0), ("loglinear", 1e-3)])
def test_mask_schedule_matches_training_bit_for_bit(kind, eps):
    ours, ref = MaskSchedule(kind, eps), ref_schedules.MaskSchedule(kind, eps)
    for t in np.linspace(0, 1, 37):
        assert ours.alpha(float(t)) == float(ref.alpha(torch.tensor(float(t), dtype=torch.float64)))


@pytest.mark.parametrize("kind,eps", [("sqrt", 1e-4), ("cosine", 1e-4)])
def test_latent_schedule_matches_training_bit_for_bit(kind, eps):
    ours, ref = LatentSchedule(kind, eps), ref_schedules.LatentSchedule(kind, eps)
    for t in list(np.linspace(0, 1, 37)) + [1 / 3, 2 / 7]:
        a, s = ref.alpha_sigma(torch.tensor(float(t), dtype=torch.float64))
        assert ours.alpha_sigma(float(t)) == (float(a), float(s))


def test_unknown_schedule_kind_is_refused():
    with pytest.raises(BundleError, match="expected one of"):
        MaskSchedule("cubic", 0.0)
    with pytest.raises(BundleError, match="expected one of"):
        LatentSchedule("linear", 0.0)


@pytest.mark.parametrize("float64", [True, False])
def test_token_step_draws_the_bridge_distribution(float64):
    """All-masked tokens: P(unmask) = (alpha_s - alpha_t) / (1 - alpha_t), then v ~ p(v); 4 sigma."""
    n, probs = 200_000, torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0])  # the last column is the mask
    log_probs = probs.clamp_min(1e-30).log().expand(1, n, 5).clone()
    log_probs[..., 4] = -1e4
    x_t = torch.full((1, n), 4)
    u = torch.from_numpy(np.random.default_rng(0).random((1, n)))
    x_s = token_step(x_t, log_probs, u, 0.2, 0.6, mask_id=4, float64=float64)
    unmasked = x_s != 4
    p_unmask = (0.6 - 0.2) / (1 - 0.2)
    assert abs(unmasked.double().mean().item() - p_unmask) < 4 * (p_unmask * (1 - p_unmask) / n) ** 0.5
    counts = torch.bincount(x_s[unmasked], minlength=5)[:4].double()
    expected = probs[:4].double() * unmasked.sum()
    assert ((counts - expected).abs() <= 4 * expected.clamp_min(1).sqrt() + 1).all()
    last = token_step(x_t, log_probs, u, 0.6, 1.0, mask_id=4, float64=float64)  # s = 0: alpha_s = 1
    assert (last != 4).all()


@pytest.mark.parametrize("float64", [True, False])
def test_the_draw_in_blocks_is_the_reference_draw_bit_for_bit(float64):
    """Rows drawn a block at a time through one reused CDF buffer (the CPU's way, a short last
    block included) give the reference token_step's tokens exactly, whatever the block size."""
    g = torch.Generator().manual_seed(0)
    B, L, V = 3, 20, 300
    log_probs = torch.log_softmax(4 * torch.randn(B, L, V, generator=g), -1)
    log_probs[..., V - 1] = -1e4
    x_t = torch.where(torch.rand(B, L, generator=g) < 0.8, V - 1, torch.randint(0, V - 1, (B, L), generator=g))
    u = torch.rand(B, L, generator=g, dtype=torch.float64)
    reference = sampling.token_step(x_t, log_probs, u, 0.3, 0.9, V - 1, float64)
    assert (reference != x_t).sum() > 20
    for block_rows in (None, 1, 7, 60, 1000):
        assert torch.equal(bridge_draw(x_t, log_probs, u, 0.9 - 0.3, 1 - 0.9, V - 1, float64, block_rows), reference)
    assert torch.equal(token_step(x_t, log_probs, u, 0.3, 0.9, V - 1, float64), reference)


def test_token_step_carries_unmasked_tokens_and_ddim_is_exact_at_the_data():
    g = torch.Generator().manual_seed(0)
    log_probs = torch.log_softmax(torch.randn(3, 10, 6, generator=g), -1)
    x_t = torch.randint(0, 6, (3, 10), generator=g)  # id 5 is the mask
    x_s = token_step(x_t, log_probs, torch.rand(3, 10, generator=g, dtype=torch.float64), 0.3, 0.5, 5)
    assert torch.equal(x_s[x_t != 5], x_t[x_t != 5])
    y0 = torch.randn(2, 3, 4, generator=g)
    eps = torch.randn(2, 3, 4, generator=g)
    a_t, s_t, a_s, s_s = 0.6, 0.8, 0.8, 0.6
    y_s = ddim_step(a_t * y0 + s_t * eps, y0, (a_t, s_t), (a_s, s_s))  # a perfect y0_hat
    torch.testing.assert_close(y_s, a_s * y0 + s_s * eps)


# ----------------------------------------------------------------------------- parity

def test_torch_backend_reproduces_the_reference_token_for_token(bundle):
    sampler = active_sampler(bundle, "torch")
    for seed in (0, 1):
        ours = sampler.sample(noise_for(bundle, seed), latent_steps(bundle))
        ref = reference(bundle, seed)
        assert torch.equal(ours.tokens, ref.tokens)
        assert (ours.tokens != bundle.shapes["mask_id"]).all()
        if bundle.variant == "mdlm":
            assert ours.latent is None
        else:
            assert torch.equal(ours.latent, ref.latent)


def test_reference_steps_are_the_runtime_steps(bundle):
    """The reference's callback sees every step of every chain with the runtime's fields, bit for bit."""
    ours = list(active_sampler(bundle, "torch").steps(noise_for(bundle, 4), latent_steps(bundle)))
    ref = []
    reference(bundle, 4, callback=ref.append)
    assert len(ref) == len(ours)
    for a, b in zip(ours, ref):
        assert (a.phase, a.index, a.total, a.t, a.s, a.network_called) == (b.phase, b.index, b.total, b.t, b.s,
                                                                           b.network_called)
        for name in ("x", "y", "y0_hat"):
            got, want = getattr(b, name), getattr(a, name)
            assert (got is None and want is None) or torch.equal(got, want), f"{a.phase} step {a.index}: {name}"


def test_float32_draws_match_the_reference_float32_option(bundle):
    ours = active_sampler(bundle, "torch", float64_draws=False).sample(noise_for(bundle, 3), latent_steps(bundle))
    assert torch.equal(ours.tokens, reference(bundle, 3, float64=False).tokens)


def test_mdlm_caching_matches_the_reference_and_skips_calls(bundle_cache):  # noqa: F811
    bundle = Bundle.open(cached_tiny_bundle(bundle_cache, "mdlm"))
    # Many steps on a batch of one: most steps unmask nothing, so the cache is hit.
    sampler, steps = active_sampler(bundle, "torch", head="dense", cache=True), 64
    trajectory = list(sampler.steps(noise_for(bundle, 5, batch=1, steps=steps)))
    ref = reference(bundle, 5, batch=1, steps=steps, cache=True)
    assert torch.equal(trajectory[-1].x, ref.tokens)
    skipped = sum(not step.network_called for step in trajectory)
    changed = sum(not torch.equal(a.x, b.x) for a, b in zip(trajectory, trajectory[1:]))
    assert skipped == steps - 1 - changed and skipped > 0


def test_ort_fp32_trajectory_agrees_with_the_reference(bundle, record_property):
    noise = noise_for(bundle, 11, batch=64)
    torch_steps = list(active_sampler(bundle, "torch").steps(noise, latent_steps(bundle)))
    ort_steps = list(active_sampler(bundle, "ort").steps(noise, latent_steps(bundle)))
    assert torch.equal(torch_steps[-1].x, reference(bundle, 11, batch=64).tokens)
    assert len(torch_steps) == len(ort_steps)
    report = []
    for a, b in zip(torch_steps, ort_steps):
        agreement = (a.x == b.x).double().mean().item()
        latent_err = None if a.y0_hat is None else (a.y0_hat - b.y0_hat).abs().max().item()
        report.append({"phase": a.phase, "step": a.index, "token_agreement": agreement,
                       "y0_hat_max_abs_err": latent_err})
        assert agreement >= TOKEN_AGREEMENT, f"step {a.phase} {a.index}: agreement {agreement}"
        if latent_err is not None:
            assert latent_err < LATENT_ATOL, f"step {a.phase} {a.index}: latent error {latent_err}"
    record_property(f"ort_fp32_trajectory_{bundle.variant}", json.dumps(report))
    print(f"\n{bundle.variant} ORT FP32 vs reference, per step:", json.dumps(report))


def test_sample_batches_uses_seed_plus_b_like_the_reference(bundle):
    sampler = active_sampler(bundle, "ort")
    ours = sample_batches(sampler, 4, num=10, steps=T_X, latent_steps=latent_steps(bundle), batch_size=4)
    model = reference_model(bundle.manifest["checkpoint"]["path"])
    ref = sampling.sample(model, 4, 10, T_X, latent_steps(bundle), batch_size=4)
    assert ours.tokens.shape == (10, bundle.shapes["L"]) and ours.tokens.dtype == torch.int64
    assert (ours.tokens == ref.tokens).double().mean().item() >= TOKEN_AGREEMENT


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["seq"])   # the main job's; .ci/run's verify gates all three at FP16
def test_fp16_samples_of_the_sawtooth_examples_are_within_5pct_swd_of_fp32(variant, bundle_cache, record_property):  # noqa: F811
    """FP16 vs FP32 ORT samples of a shipped example: |SWD16 - SWD32| <= 5% of SWD32, SWD to data.

    1000 samples per precision (4 token steps; seq 4 latent steps), the same draws for both
    (common random numbers: the difference measures the precision, not the Monte-Carlo noise
    of two independent sample sets), against 1000 fresh sawtooth sequences, SWD over 1000
    directions. For scale, the report also gives the data floor (two independent data sets).
    """
    ckpt = EXAMPLES / f"sawtooth-{variant}.pt"
    if not ckpt.is_file():
        pytest.skip(f"{ckpt} is not there yet (examples/README.md trains it)")
    pytest.importorskip("lddm_export.build", reason="needs the exporter (lddm-export build)")
    from training.data import sample_sawtooth
    from training.metrics import sliced_wasserstein

    bundle = Bundle.open(built_example_bundle(bundle_cache / "examples", ckpt))
    T_y = SWD_STEPS if variant == "seq" else None

    def draw(precision, seed):
        sampler = active_sampler(bundle, "ort", precision)
        return sample_batches(sampler, seed, SWD_SAMPLES, SWD_STEPS, T_y, SWD_BATCH).tokens

    fp32, fp16 = draw("fp32", 0), draw("fp16", 0)
    L = bundle.shapes["L"]
    data = sample_sawtooth(SWD_SAMPLES, L, torch.Generator().manual_seed(1))
    data_other = sample_sawtooth(SWD_SAMPLES, L, torch.Generator().manual_seed(2))
    swd32, swd16 = sliced_wasserstein(fp32, data), sliced_wasserstein(fp16, data)
    report = {"swd_fp32": swd32, "swd_fp16": swd16, "relative_change": abs(swd16 - swd32) / swd32,
              "data_floor": sliced_wasserstein(data_other, data),
              "token_agreement_fp16_fp32": (fp16 == fp32).double().mean().item()}
    record_property(f"fp16_swd_{variant}", json.dumps(report))
    print(f"\n{variant} FP16 vs FP32 SWD:", json.dumps(report))
    assert (fp16 != bundle.shapes["mask_id"]).all()
    assert report["relative_change"] <= SWD_MARGIN


# ----------------------------------------------------------------------------- the step API

def test_steps_yield_every_step_in_order_and_carry_unmasked_tokens(bundle):
    sampler = active_sampler(bundle, "ort")
    steps = list(sampler.steps(noise_for(bundle, 2), latent_steps(bundle)))
    mask_id = bundle.shapes["mask_id"]
    expected = ["latent"] * T_Y + ["token"] * T_X if bundle.variant == "seq" else ["token"] * T_X
    assert [s.phase for s in steps] == expected
    tokens = [s for s in steps if s.phase == "token"]
    assert [s.index for s in tokens] == list(range(T_X)) and tokens[0].t == 1.0 and tokens[-1].s == 0.0
    previous = torch.full_like(tokens[0].x, mask_id)
    for step in tokens:
        was_unmasked = previous != mask_id
        assert torch.equal(step.x[was_unmasked], previous[was_unmasked])  # SUBS carry-over
        previous = step.x
    assert (previous != mask_id).all()
    seen = []
    result = sampler.sample(noise_for(bundle, 2), latent_steps(bundle), callback=seen.append)
    assert len(seen) == len(steps) and torch.equal(result.tokens, steps[-1].x)


def test_seq_without_latent_steps_and_noise_without_latent_are_refused(bundle_cache):  # noqa: F811
    seq = Bundle.open(cached_tiny_bundle(bundle_cache, "seq"))
    sampler = active_sampler(seq, "ort")
    with pytest.raises(LddmError, match="latent_steps"):
        sampler.steps(noise_for(seq, 0), None)
    with pytest.raises(ShapeMismatch, match="y_init"):
        sampler.steps(draw_noise(0, 2, 3, seq.shapes["L"]), 3)
    with pytest.raises(ShapeMismatch, match="noise u must have shape"):
        sampler.steps(draw_noise(0, 2, 3, seq.shapes["L"] + 1, (seq.shapes["P"], seq.shapes["D"])), 3)
    with pytest.raises(ShapeMismatch, match="noise y_init must have shape"):
        sampler.steps(draw_noise(0, 2, 3, seq.shapes["L"], (seq.shapes["P"] + 1, seq.shapes["D"])), 3)
    with pytest.raises(LddmError, match="mdlm sampler only"):
        Sampler.from_bundle(seq, sampler.runners, cache=True)


# ----------------------------------------------------------------------------- runners and factory

def test_runner_checks_its_feed_and_state(bundle_cache):  # noqa: F811
    bundle = Bundle.open(cached_tiny_bundle(bundle_cache, "mdlm"))
    L = bundle.shapes["L"]
    for backend in ("torch", "ort"):
        runner = make_runners(bundle, backend, reference=load_reference_graphs)["denoiser"]
        feed = {"x_t": torch.zeros(2, L, dtype=torch.int64), "t": torch.ones(2)}
        with pytest.raises(LddmError, match="not active"):
            runner.infer(feed)
        with runner:
            out = runner.infer(feed)["log_probs"]
            assert out.shape == (2, L, bundle.shapes["V"]) and out.dtype == torch.float32
            assert torch.isfinite(out).all()
            with pytest.raises(ShapeMismatch, match="must be int64, got float32"):
                runner.infer({"x_t": torch.zeros(2, L), "t": torch.ones(2)})
            with pytest.raises(ShapeMismatch, match="must have shape"):
                runner.infer({"x_t": torch.zeros(2, L + 1, dtype=torch.int64), "t": torch.ones(2)})
            with pytest.raises(ShapeMismatch, match="above the engine profile"):
                runner.infer({"x_t": torch.zeros(65, L, dtype=torch.int64), "t": torch.ones(65)})


@pytest.mark.parametrize("backend,precision,device,match", [
    ("tensorflow", "fp32", "cpu", "backend 'tensorflow' is unknown; choose one of torch, ort, ort-trt, trt"),
    ("ort", "int4", "cpu", "precision 'int4' is unknown; choose one of fp32, fp16"),
    ("ort", "fp32", "gpu0", "device 'gpu0' is unknown; choose one of cpu, cuda, cuda:N"),
    ("torch", "fp16", "cpu", "fp16 is CUDA autocast"),
    ("trt", "fp16", "cpu", "runs on a CUDA GPU"),
])
def test_make_runners_refuses_unknown_choices(bundle_cache, backend, precision, device, match):  # noqa: F811
    bundle = Bundle.open(cached_tiny_bundle(bundle_cache, "mdlm"))
    with pytest.raises(BackendUnavailable, match=match):
        make_runners(bundle, backend, precision, device)


def test_torch_backend_finds_the_checkpoint_or_refuses(bundle_cache, tmp_path):  # noqa: F811
    root = copy_bundle(cached_tiny_bundle(bundle_cache, "mdlm"), tmp_path / "bundle")
    moved = tmp_path / "elsewhere.pt"
    (root / "model.pt").rename(moved)
    bundle = Bundle.open(root)
    with pytest.raises(BundleError, match="does not exist; pass the bundle's model.pt with --ckpt"):
        make_runners(bundle, "torch", reference=load_reference_graphs)["denoiser"].activate()
    with make_runners(bundle, "torch", ckpt=moved, reference=load_reference_graphs)["denoiser"] as runner:  # --ckpt finds it again
        assert runner.is_active
    other = tmp_path / "other.pt"
    from fixtures import tiny_checkpoint
    tiny_checkpoint(other, "mdlm", seed=1)
    with pytest.raises(BundleError, match="sha256 differs"):
        make_runners(bundle, "torch", ckpt=other, reference=load_reference_graphs)["denoiser"].activate()
    with pytest.raises(BackendUnavailable, match="pass reference=training.checkpoint.load_reference_graphs"):
        make_runners(bundle, "torch")  # the runtime holds no model code of its own



def _random_feed(spec, batch: int, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    from lddm_export.export import sample_inputs
    return dict(zip(spec.input_names, sample_inputs(spec, batch, vocab, torch.Generator().manual_seed(seed))))


def test_compiled_torch_runner_computes_what_the_eager_one_does(bundle_cache):  # noqa: F811
    """torch.compile (inductor, here its C++ CPU backend) fuses kernels; the function stays the same.
    The sampler's compiled token step takes its weights from the device; one compilation serves
    every step."""
    bundle = Bundle.open(cached_tiny_bundle(bundle_cache, "fuji"))
    eager = make_runners(bundle, "torch", threads=1, reference=load_reference_graphs)["denoiser"].activate()
    compiled = make_runners(bundle, "torch", compile=True, reference=load_reference_graphs)["denoiser"].activate()
    feed = _random_feed(eager.spec, 3, bundle.shapes["V"], seed=0)
    compare_outputs("denoiser", compiled.infer(feed), eager.infer(feed),  # raises outside the tolerance
                    graph_tolerances("fp32", eager.spec.output_names))
    noise = noise_for(bundle, 4)
    torch._dynamo.utils.counters.clear()
    ours = Sampler.from_bundle(bundle, {"denoiser": compiled}, head="dense", compile=True).sample(noise)
    ref = Sampler.from_bundle(bundle, {"denoiser": eager}, head="dense").sample(noise)
    assert (ours.tokens == ref.tokens).double().mean().item() >= TOKEN_AGREEMENT
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2  # the module and the token step


def test_torch_fp16_autocast_meets_the_fp16_tolerances(bundle_cache):  # noqa: F811
    """The torch backend's fp16 (autocast; CUDA in use, the runner itself runs on any device)."""
    from runtimes.backends.torch_runner import CheckpointModules, TorchRunner
    bundle = Bundle.open(cached_tiny_bundle(bundle_cache, "seq"))
    modules = CheckpointModules(bundle, load_reference_graphs)
    for graph in bundle.graph_names:
        fp32 = TorchRunner(bundle, graph, "cpu", modules).activate()
        fp16 = TorchRunner(bundle, graph, "cpu", modules, precision="fp16").activate()
        feed = _random_feed(fp32.spec, 8, bundle.shapes["V"], seed=1)
        got, ref = fp16.infer(feed), fp32.infer(feed)
        assert all(got[name].dtype == torch.float32 for name in got)  # the spec's dtype, not float16
        assert any(not torch.equal(got[name], ref[name]) for name in got)  # FP16 arithmetic did happen
        compare_outputs(graph, got, ref, graph_tolerances("fp16", fp32.spec.output_names))  # raises if outside


def test_compile_is_refused_off_the_torch_backend(bundle_cache):  # noqa: F811
    bundle = Bundle.open(cached_tiny_bundle(bundle_cache, "mdlm"))
    with pytest.raises(BackendUnavailable, match="--compile applies to the torch backend only"):
        make_runners(bundle, "ort", compile=True)


# ----------------------------------------------------------------------------- text

def test_text_decoder_matches_the_training_decoder():
    from training.data import decode_ids, tokenizer_entry, train_bpe_tokenizer
    lines = ["to be or not to be", "that is the question", "whether tis nobler in the mind"] * 20
    entry = tokenizer_entry(train_bpe_tokenizer(lines, 300), "bpe")
    ids = np.array([[5, 17, 40, 2, 99], [1, 2, 3, 4, entry["vocab_size"]]])  # last id: the mask
    assert TextDecoder(entry).decode(ids) == decode_ids(entry, ids)
    assert TextDecoder(None).decode(ids) == [None, None]
    with pytest.raises(BundleError, match="no 'json' field"):
        TextDecoder({"kind": "bpe"})


# ----------------------------------------------------------------------------- GPU

def _gpu_check_module():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    return gpu_check


def test_gpu_check_renders_the_recorded_gpu_report():
    """The GPU runs' reports (RESULTS.md quotes them) render as tables."""
    from pathlib import Path
    results = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    for name in ("gpu_check_h100.json", "gpu_check_h100_run1.json"):
        table = _gpu_check_module().markdown(json.loads((results / name).read_text()))
        assert "| mdlm | 105.0 | 1 | compiled |" in table and "errors: 0" in table


def test_gpu_check_dry_run_writes_its_report(tmp_path):
    gpu_check = _gpu_check_module()
    report = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--variants", "mdlm,seq", "--batches", "1,2",
                             "--modes", "eager,graphs"])  # the compiled modes run in tests of their own
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["dry_run"] and [(r["variant"], r["batch"]) for r in saved["speed"]] == [
        ("mdlm", 1), ("seq", 1), ("mdlm", 2), ("seq", 2)]  # every B = 1 row first
    assert all(r["eager_speedup"] == 1.0 and r["graphs_ms_per_step"] > 0 for r in report["speed"])
    assert all(r["eager_token_agreement"] == r["graphs_token_agreement"] == 1.0  # CPU vs CPU: exact
               for r in report["parity"])
    assert report["host_copies"]["checked"] is False and report["errors"] == []
    assert [(r["model"], r["mode"], r["batch"], r["steps"]) for r in report["sparse"]] == [
        ("edge-mdlm", mode, b, 2) for mode in ("eager", "graphs") for b in (1, 2)]
    assert all(r["tokens_differing"] == 0 and r["speedup"] > 0 for r in report["sparse"])
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| variant |" in table and "| edge-mdlm | graphs | 2 | 2 |" in table


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph,compile,precision", [
    (False, False, "fp32"), (True, False, "fp32"), (True, True, "fp32"), (True, True, "fp16")])
def test_cuda_sampling_loop_never_synchronises(bundle, cuda_graph, compile, precision):
    """The dense head's loop (the sparse head reads each step's row count back, by design)."""
    runners = make_runners(bundle, "torch", precision, "cuda", cuda_graph=cuda_graph, compile=compile,
                           reference=load_reference_graphs)
    for runner in runners.values():
        runner.activate()
    sampler = Sampler.from_bundle(bundle, runners, head="dense")
    noise = noise_for(bundle, 0).to("cuda")
    sampler.sample(noise, latent_steps(bundle))  # warm-up (graph capture synchronises)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host copy or sync raises
    try:
        result = sampler.sample(noise, latent_steps(bundle))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = active_sampler(bundle, "torch").sample(noise_for(bundle, 0), latent_steps(bundle))
    assert (result.tokens.cpu() == cpu.tokens).double().mean().item() >= 0.99


@pytest.mark.gpu
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_cuda_sparse_head_agrees_with_the_cpu(bundle, cuda_graph):
    """The sparse head on CUDA (the head's rows padded to powers of two, so captured graphs replay)."""
    runners = make_runners(bundle, "torch", "fp32", "cuda", cuda_graph=cuda_graph, reference=load_reference_graphs)
    for runner in runners.values():
        runner.activate()
    sampler = Sampler.from_bundle(bundle, runners, head="sparse")
    assert sampler.pad_rows
    result = sampler.sample(noise_for(bundle, 0), latent_steps(bundle))
    cpu = active_sampler(bundle, "torch", head="sparse").sample(noise_for(bundle, 0), latent_steps(bundle))
    assert (result.tokens.cpu() == cpu.tokens).double().mean().item() >= 0.99


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["ort", "ort-trt"])
def test_ort_on_cuda_keeps_outputs_on_the_device_and_agrees(bundle, backend):
    import onnxruntime
    provider = {"ort": "CUDAExecutionProvider", "ort-trt": "TensorrtExecutionProvider"}[backend]
    if provider not in onnxruntime.get_available_providers():
        pytest.skip(f"onnxruntime here lacks {provider} (install onnxruntime-gpu)")
    runners = make_runners(bundle, backend, "fp32", "cuda")
    for runner in runners.values():
        runner.activate()
    result = Sampler.from_bundle(bundle, runners).sample(noise_for(bundle, 0), latent_steps(bundle))
    assert result.tokens.device.type == "cuda"
    cpu = active_sampler(bundle, "ort").sample(noise_for(bundle, 0), latent_steps(bundle))
    assert (result.tokens.cpu() == cpu.tokens).double().mean().item() >= 0.99  # 256 tokens: <= 2 differ
