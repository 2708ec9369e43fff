"""The sparse head: log-probs only where tokens unmask, the same tokens as the dense head.

Levels: the token step (the rows that unmask are known before the network runs, and the draw
on them is the dense draw); the graphs (head(trunk) is the dense token graph, on ORT and in
torch); the samplers (sparse = dense token for token under the same noise, on ORT FP32, the
torch backend and the shipped sawtooth examples; FP16 agreement reported); the skips (a step
where nothing unmasks runs no graph, or FUJI's trunk alone); and the options and refusals.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fixtures import built_example_bundle, cached_full_bundle, cached_tiny_bundle
from runtimes.backends import make_runners
from runtimes.base import Runner
from runtimes.bundle import Bundle
from runtimes.errors import LddmError, ShapeMismatch
from runtimes.noise import draw_noise, latent_shape
from runtimes.samplers import Sampler, sampler_graphs, sparse_token_step, token_step, unmasking_rows
from training import sampling
from training.checkpoint import load_checkpoint, load_reference_graphs
from training.model import MASK_LOGIT_PENALTY

VARIANTS = ("mdlm", "fuji", "seq")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="module", params=VARIANTS)
def bundle(request, bundle_cache):  # noqa: F811
    return Bundle.open(cached_tiny_bundle(bundle_cache, request.param))


def runners_of(bundle: Bundle, backend: str = "ort", precision: str = "fp32") -> dict[str, Runner]:
    graphs = sorted(set(sampler_graphs(bundle.variant, "sparse")) | set(sampler_graphs(bundle.variant, "dense")))
    runners = make_runners(bundle, backend, precision, "cpu", graphs=graphs, threads=1,
                           reference=load_reference_graphs)
    return {g: r.activate() for g, r in runners.items()}


def noise_for(bundle: Bundle, seed: int, batch: int, steps: int):
    s = bundle.shapes
    return draw_noise(seed, batch, steps, s["L"], latent_shape(bundle.variant, s))


def both_heads(bundle: Bundle, runners: dict, noise, latent_steps=None, **options):
    return {head: Sampler.from_bundle(bundle, runners, head=head, **options).sample(noise, latent_steps)
            for head in ("dense", "sparse")}


class CountingRunner(Runner):
    """A runner that counts its calls and the rows (dynamic extent) it was fed."""

    backend = "counting"

    def __init__(self, inner: Runner):
        super().__init__(inner.spec, str(inner.device), inner.max_batch)
        self.inner, self.calls, self.rows = inner, 0, 0

    def _activate_impl(self):
        self.inner.activate()

    def _deactivate_impl(self):
        pass

    def _infer_impl(self, feed):
        self.calls += 1
        self.rows += next(iter(feed.values())).shape[0]
        return self.inner.infer(feed)


# ----------------------------------------------------------------------------- the token step

@pytest.mark.parametrize("alpha_t,alpha_s", [(0.0, 0.01), (0.2, 0.3), (0.5, 0.9), (0.7, 1.0)])
@pytest.mark.parametrize("float64", [True, False])
def test_sparse_token_step_is_the_dense_step(alpha_t, alpha_s, float64):
    g = torch.Generator().manual_seed(0)
    B, L, V = 8, 64, 50
    mask_id = V - 1
    logits = 3 * torch.randn(B, L, V, generator=g)
    logits[..., mask_id] += MASK_LOGIT_PENALTY
    log_probs = torch.log_softmax(logits, -1)
    x = torch.where(torch.rand(B, L, generator=g) < 0.7, mask_id, torch.randint(0, V - 1, (B, L), generator=g))
    u = torch.rand(B, L, generator=g, dtype=torch.float64)
    dense = token_step(x, log_probs, u, alpha_t, alpha_s, mask_id, float64)
    rows = unmasking_rows(x, u, alpha_t, alpha_s, mask_id)
    sparse = sparse_token_step(x, rows, log_probs.reshape(-1, V)[rows], u, alpha_t, alpha_s, mask_id, float64)
    assert torch.equal(sparse, dense)
    changed = (dense != x).flatten().nonzero().squeeze(1)
    assert set(changed.tolist()) <= set(rows.tolist())   # every unmasked position was a row
    if alpha_s == 1.0:   # the last step unmasks every masked position
        assert torch.equal(rows, (x == mask_id).flatten().nonzero().squeeze(1))
    else:  # ... and the rows are few: the masked positions times the unmask probability
        expected = (x == mask_id).sum().item() * (alpha_s - alpha_t) / (1 - alpha_t)
        assert abs(rows.numel() - expected) <= 4 * expected ** 0.5 + 2


# ----------------------------------------------------------------------------- the graphs

@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_head_of_trunk_is_the_dense_token_graph(bundle, backend):
    runners = runners_of(bundle, backend)
    s, B = bundle.shapes, 3
    g = torch.Generator().manual_seed(1)
    feed = {"x_t": torch.randint(0, s["V"], (B, s["L"]), generator=g), "t": torch.rand(B, generator=g),
            "y_t": torch.randn(B, s["P"], s["D"], generator=g), "y0": torch.randn(B, s["P"], s["D"], generator=g)}
    dense_graph = sampler_graphs(bundle.variant, "dense")[-1]
    dense = runners[dense_graph].infer({k: feed[k] for k in runners[dense_graph].spec.input_names})
    trunk = runners["trunk"].infer({k: feed[k] for k in runners["trunk"].spec.input_names})
    hidden = trunk["hidden"]
    assert hidden.shape == (B, s["L"], s["W"])
    rows = torch.tensor([0, 5, s["L"] + 1, B * s["L"] - 1])
    head = runners["head"].infer({"hidden": hidden.reshape(-1, s["W"])[rows]})["log_probs"]
    torch.testing.assert_close(head, dense["log_probs"].reshape(-1, s["V"])[rows], rtol=1e-5, atol=1e-5)
    if bundle.variant == "fuji":
        torch.testing.assert_close(trunk["y0_hat"], dense["y0_hat"], rtol=1e-5, atol=1e-6)


def test_head_rows_are_bounded_by_the_batch_profile(bundle):
    head = runners_of(bundle)["head"]
    limit = bundle.manifest["batch_profile"]["max"] * bundle.shapes["L"]
    assert bundle.profile("head") == {"min": 1, "opt": max(1, bundle.manifest["batch_profile"]["opt"]
                                                          * bundle.shapes["L"] // 16), "max": limit}
    with pytest.raises(ShapeMismatch, match=f"rows for graph 'head' are above the profile's maximum {limit}"):
        head.infer({"hidden": torch.zeros(limit + 1, bundle.shapes["W"])})


# ----------------------------------------------------------------------------- the samplers

@pytest.mark.parametrize("backend", ["ort", "torch"])
@pytest.mark.parametrize("steps", [1, 4, 32])
def test_sparse_sampler_gives_the_dense_tokens(bundle, backend, steps):
    runners = runners_of(bundle, backend)
    noise = noise_for(bundle, 3, 16, steps)
    latent_steps = 4 if bundle.variant == "seq" else None
    out = both_heads(bundle, runners, noise, latent_steps)
    assert torch.equal(out["sparse"].tokens, out["dense"].tokens)
    assert (out["sparse"].tokens != bundle.shapes["mask_id"]).all()
    if bundle.variant != "mdlm":
        assert torch.equal(out["sparse"].latent, out["dense"].latent)


def test_sparse_torch_runtime_reproduces_the_reference_sampler(bundle):
    runners = runners_of(bundle, "torch")
    model = load_checkpoint(bundle.manifest["checkpoint"]["path"])[0]
    noise = sampling.make_noise(5, 8, model.cfg, 8)
    latent_steps = 3 if bundle.variant == "seq" else None
    got = Sampler.from_bundle(bundle, runners, head="sparse").sample(noise, latent_steps)
    assert torch.equal(got.tokens, sampling.sample_call(model, noise, latent_steps).tokens)


def test_fp16_sparse_agrees_with_fp16_dense(bundle_cache, record_property):
    bundle = Bundle.open(cached_full_bundle(bundle_cache, "fuji")[0])
    out = both_heads(bundle, runners_of(bundle, "ort", "fp16"), noise_for(bundle, 0, 32, 8))
    agreement = float((out["sparse"].tokens == out["dense"].tokens).double().mean())
    record_property("fp16_sparse_dense_token_agreement", agreement)
    assert agreement >= 0.99


# The main job's example; .ci/run's verify compares the sparse sampler with the dense reference on
# every shipped example (trajectory level, token agreement >= 99.9%).
@pytest.mark.parametrize("variant", ["seq"])
def test_shipped_sawtooth_examples_sample_the_same_tokens_with_either_head(variant, bundle_cache):  # noqa: F811
    ckpt = EXAMPLES / f"sawtooth-{variant}.pt"
    bundle = Bundle.open(built_example_bundle(bundle_cache / "examples", ckpt))
    runners = runners_of(bundle)
    for steps in (4, 16):
        out = both_heads(bundle, runners, noise_for(bundle, 1, 64, steps), 4 if variant == "seq" else None)
        assert torch.equal(out["sparse"].tokens, out["dense"].tokens)


# ----------------------------------------------------------------------------- skips and options

def test_a_step_where_nothing_unmasks_runs_no_graph(bundle_cache):  # noqa: F811
    for variant in VARIANTS:
        bundle = Bundle.open(cached_tiny_bundle(bundle_cache, variant))
        counted = {g: CountingRunner(r).activate() for g, r in runners_of(bundle).items()}
        T, B, L = 4 * bundle.shapes["L"], 2, bundle.shapes["L"]   # far more steps than tokens
        steps = list(Sampler.from_bundle(bundle, counted, head="sparse").steps(noise_for(bundle, 2, B, T), 2))
        token_steps = [s for s in steps if s.phase == "token"]
        x = [torch.full((B, L), bundle.shapes["mask_id"])] + [s.x for s in token_steps]
        changed = sum(not torch.equal(a, b) for a, b in zip(x, x[1:]))
        assert changed <= counted["head"].calls < T / 2   # most steps unmask nothing and skip the head
        # every position leaves the mask once, in a head call; rows inside the margin may stay masked
        assert B * L <= counted["head"].rows <= 1.1 * B * L + 8
        if variant == "fuji":   # the trunk still runs for y0_hat
            assert counted["trunk"].calls == T and all(s.network_called for s in token_steps)
        else:                   # no graph at all
            assert counted["trunk"].calls == counted["head"].calls == sum(s.network_called for s in token_steps)


def test_mdlm_cache_with_the_sparse_head_is_the_dense_cache(bundle_cache):  # noqa: F811
    bundle = Bundle.open(cached_tiny_bundle(bundle_cache, "mdlm"))
    runners = {g: CountingRunner(r).activate() for g, r in runners_of(bundle).items()}
    for seed in range(3):
        noise = noise_for(bundle, seed, 2, 48)
        cached = both_heads(bundle, runners, noise, cache=True)
        assert torch.equal(cached["sparse"].tokens, cached["dense"].tokens)
    assert 0 < runners["trunk"].calls <= runners["denoiser"].calls < 3 * 48


def test_padded_rows_give_the_same_tokens(bundle):
    runners = {g: CountingRunner(r).activate() for g, r in runners_of(bundle).items()}
    noise = noise_for(bundle, 6, 8, 8)
    latent_steps = 2 if bundle.variant == "seq" else None
    plain = Sampler.from_bundle(bundle, runners, head="sparse").sample(noise, latent_steps)
    rows_plain = runners["head"].rows
    padded = Sampler.from_bundle(bundle, runners, head="sparse", pad_rows=True).sample(noise, latent_steps)
    assert torch.equal(plain.tokens, padded.tokens)
    assert runners["head"].rows - rows_plain >= rows_plain   # padding fed more rows


def test_sampler_refuses_an_unknown_head_and_missing_graphs(bundle_cache):  # noqa: F811
    bundle = Bundle.open(cached_tiny_bundle(bundle_cache, "seq"))
    runners = runners_of(bundle)
    with pytest.raises(LddmError, match="head 'wide' is unknown; choose one of sparse, dense"):
        Sampler.from_bundle(bundle, runners, head="wide")
    with pytest.raises(LddmError, match=r"sparse head needs runners for \['latent_denoiser', 'trunk', 'head'\], "
                                        r"missing \['head'\]"):
        Sampler.from_bundle(bundle, {g: r for g, r in runners.items() if g != "head"}, head="sparse")
    assert sampler_graphs("mdlm", "dense") == ("denoiser",)
    assert sampler_graphs("seq", "dense") == ("latent_denoiser", "token_denoiser")


def test_the_head_engine_profile_spans_one_row_to_a_full_batch(bundle_cache):  # noqa: F811
    from lddm_export.engines import profile_shapes
    from runtimes.backends.ort_runner import trt_profile_options

    bundle = Bundle.open(cached_tiny_bundle(bundle_cache, "fuji"))
    L, W, batch = bundle.shapes["L"], bundle.shapes["W"], {"min": 2, "opt": 8, "max": 64}
    rows = bundle.profile("head", batch)
    assert rows == {"min": 1, "opt": 8 * L // 16, "max": 64 * L} and bundle.profile("trunk", batch) == batch
    hidden = bundle.manifest["graphs"]["head"]["inputs"][0]
    assert profile_shapes(hidden, rows) == ((1, W), (8 * L // 16, W), (64 * L, W))
    assert trt_profile_options(bundle.spec("head"), rows)["trt_profile_max_shapes"] == f"hidden:{64 * L}x{W}"


def test_a_bundle_from_before_the_sparse_head_is_refused_with_the_rebuild(bundle_cache, tmp_path):  # noqa: F811
    import json
    import shutil

    from runtimes.errors import BundleError

    root = tmp_path / "old"
    shutil.copytree(cached_tiny_bundle(bundle_cache, "mdlm"), root)
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "version": 1}))
    with pytest.raises(BundleError, match="has version 1, but this runtime reads version 2; rebuild the bundle"):
        Bundle.open(root)
