"""Serving requests through one sampler (runtimes/serving.py): requests batched together give
each request the samples `lddm-export sample` gives it alone, and bad requests get their own
error without failing the others."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fixtures import cached_tiny_bundle
from runtimes.backends import make_runners
from runtimes.bundle import Bundle
from runtimes.errors import LddmError
from runtimes.prompts import PromptEncoder, PromptError
from runtimes.samplers import Sampler, sample_batches, sampler_graphs
from runtimes.serving import Limits, RequestError, RequestHandler, parse_request, request_fields, run_requests

MAX_BATCH = 8


def sampler_of(bundle: Bundle, **options) -> Sampler:
    runners = make_runners(bundle, "ort", "fp32", "cpu", graphs=list(sampler_graphs(bundle.variant)), threads=1)
    return Sampler.from_bundle(bundle, {g: r.activate() for g, r in runners.items()}, **options)


@pytest.fixture(scope="module", params=["mdlm", "fuji", "seq"])
def bundle(request, bundle_cache):
    return Bundle.open(cached_tiny_bundle(bundle_cache, request.param, text=True))


def fields(**overrides) -> dict:
    return {"seed": 3, "num": 5, "steps": 4, **overrides}


def test_requests_served_together_equal_each_sampled_alone(bundle):
    """Different step counts, a request over the call size (chunks from seed + b), a prompt, a
    template: each request's tokens are sample_batches' at the default batch size."""
    sampler = sampler_of(bundle)
    encoder = PromptEncoder(bundle.manifest["tokenizer"], bundle.shapes["L"], bundle.shapes["V"] - 1)
    requests = [parse_request(f, Limits(), bundle.variant, bundle.shapes, encoder) for f in (
        fields(), fields(seed=7, num=11), fields(seed=9, num=2, steps=6), fields(seed=1, num=3, prompt="ab a"),
        fields(seed=2, num=2, template="a ____ b", hole_tokens=2), fields(seed=5, num=1, latent_steps=2 * (bundle.variant == "seq")))]
    if bundle.variant == "seq":   # prompted SEQ with 3 latent chains per sample: a group of its own
        requests.append(parse_request(fields(seed=6, num=2, prompt="ab", latent_candidates=3), Limits(),
                                      bundle.variant, bundle.shapes, encoder))
    calls = []
    sample = sampler.sample
    sampler.sample = lambda noise, *args, **kw: calls.append(noise.batch) or sample(noise, *args, **kw)
    served = run_requests(sampler, requests, MAX_BATCH)
    sampler.sample = sample
    # T = 4: chunks of 5, 8 + 3, 3, 2 and 1 rows (seq: the 1 has T_y = 2, a group of its own), packed
    # in order into calls of <= 8 rows; then T = 6: 2 rows. 9 chunks, 5 calls.
    assert calls == ([1, 5, 8, 8, 2, 2] if bundle.variant == "seq" else [5, 8, 8, 1, 2])
    for request, result in zip(requests, served):
        alone = sample_batches(sampler, request.seed, request.num, request.steps, request.latent_steps,
                               MAX_BATCH, known=request.known, latent_candidates=request.latent_candidates)
        assert torch.equal(result.tokens, alone.tokens)
        assert (result.latent is None) == (bundle.variant == "mdlm")
        if result.latent is not None:
            assert torch.equal(result.latent, alone.latent)
    assert not torch.equal(served[0].tokens, served[1].tokens[:5])   # the seed matters


def test_a_bad_request_gets_its_error_and_the_others_their_samples(bundle):
    handler = RequestHandler(sampler_of(bundle), bundle.manifest, Limits(max_samples=16), MAX_BATCH)
    good = {k: np.array([[v]]) for k, v in fields().items()}
    bad = {**good, "num": np.array([[17]])}
    responses = handler([good, bad, good])
    assert responses[0]["error"][0, 0] == b"" and responses[0]["tokens"].shape == (1, 5, bundle.shapes["L"])
    assert b"num 17 is above the limit of 16" in responses[1]["error"][0, 0] and set(responses[1]) == {"error"}
    assert np.array_equal(responses[0]["tokens"], responses[2]["tokens"])
    assert all(isinstance(t, bytes) and t for t in responses[0]["text"][0])


def test_request_fields_are_validated_in_one_place(bundle_cache):
    bundle = Bundle.open(cached_tiny_bundle(bundle_cache, "mdlm"))   # sawtooth: no tokenizer
    shapes, limits = bundle.shapes, Limits(max_samples=8, max_steps=32)
    cases = [
        ({"seed": 1, "num": 2}, r"has no 'steps'"),
        (fields(num=0), r"num must be a positive integer, got 0"),
        (fields(steps=33), r"steps 33 is above the limit of 32"),
        (fields(seed=-1), r"seed must be a non-negative integer"),
        (fields(steps="x"), r"steps must be an integer, got 'x'"),
        (fields(latent_steps=3), r"latent_steps applies to seq bundles only"),
        (fields(prompt="hi"), r"has no tokenizer, so it takes no text prompt"),
        (fields(latent_candidates=2), r"latent_candidates applies to seq bundles only"),
        (fields(latent_candidates=17), r"latent_candidates 17 is above the limit of 16"),
    ]
    for request, message in cases:
        with pytest.raises(LddmError, match=message):
            parse_request(request, limits, "mdlm", shapes)
    with pytest.raises(RequestError, match=r"latent_candidates keeps the latent that best explains the prompt"):
        parse_request(fields(latent_candidates=2), limits, "seq", shapes)
    with pytest.raises(RequestError, match=r"both a prompt and a template"):
        parse_request(fields(prompt="a", template="b ____"), limits, "fuji", shapes)
    with pytest.raises(RequestError, match=r"unknown inputs \['nums'\]"):
        request_fields({"nums": np.array([[1]])})
    with pytest.raises(RequestError, match=r"has shape \[2, 1\]; send one value per request"):
        request_fields({"seed": np.array([[1], [2]])})
    with pytest.raises(RequestError, match=r"'prompt' is not UTF-8 text"):
        request_fields({"prompt": np.array([[b"\xff\xfe"]], dtype=object)})


def test_prompt_errors_of_a_request_name_the_request(bundle_cache):
    bundle = Bundle.open(cached_tiny_bundle(bundle_cache, "fuji", text=True))
    encoder = PromptEncoder(bundle.manifest["tokenizer"], bundle.shapes["L"], bundle.shapes["V"] - 1)
    with pytest.raises(PromptError, match=r"the request's template has no hole"):
        parse_request(fields(template="no holes"), Limits(), "fuji", bundle.shapes, encoder)
    with pytest.raises(PromptError, match=r"the request's prompt is \d+ tokens"):
        parse_request(fields(prompt="ab " * 200), Limits(), "fuji", bundle.shapes, encoder)


def test_the_mdlm_cache_is_refused(bundle_cache):
    bundle = Bundle.open(cached_tiny_bundle(bundle_cache, "mdlm"))
    request = parse_request(fields(), Limits(), "mdlm", bundle.shapes)
    with pytest.raises(LddmError, match=r"MDLM cache makes a row's samples depend on the others"):
        run_requests(sampler_of(bundle, cache=True), [request], MAX_BATCH)
