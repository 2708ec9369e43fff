"""Prompted and infilling generation: clamped tokens through every sampler, head and backend,
the text -> clamped-token encoding, and the sample command's prompts and refusals."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fixtures import cached_tiny_bundle, run_sample, tiny_tokenizer_entry
from runtimes.backends import make_runners
from runtimes.bundle import Bundle
from runtimes.errors import LddmError, ShapeMismatch
from runtimes.noise import Noise, draw_noise, latent_shape
from runtimes.prompts import FREE, HOLE, PromptEncoder, PromptError, start_tokens
from runtimes.samplers import Sampler
from training import sampling
from training.checkpoint import load_checkpoint, load_reference_graphs

B, T = 6, 8


@pytest.fixture(scope="module", params=["mdlm", "fuji", "seq", "seq-prompt-latent"])
def bundle(request, bundle_cache):  # noqa: F811
    variant, _, prompt_aware = request.param.partition("-")
    return Bundle.open(cached_tiny_bundle(bundle_cache, variant, **({"prompt_latent": True} if prompt_aware else {})))


def known_tokens(bundle: Bundle) -> torch.Tensor:
    """A prompt at the start of half the samples, a span in the middle of the others."""
    L, V = bundle.shapes["L"], bundle.shapes["V"]
    g = torch.Generator().manual_seed(0)
    known = torch.full((B, L), FREE, dtype=torch.int64)
    known[: B // 2, : L // 4] = torch.randint(0, V - 1, (B // 2, L // 4), generator=g)
    known[B // 2:, L // 2: L // 2 + 3] = torch.randint(0, V - 1, (B - B // 2, 3), generator=g)
    return known


@pytest.mark.parametrize("backend", ["ort", "torch"])
def test_clamped_tokens_never_change_and_every_form_samples_alike(bundle, backend):
    known = known_tokens(bundle)
    clamped = known != FREE
    runners = {g: r.activate() for g, r in make_runners(bundle, backend, "fp32", "cpu", threads=1,
                                                        reference=load_reference_graphs).items()}
    noise = draw_noise(4, B, T, bundle.shapes["L"], latent_shape(bundle.variant, bundle.shapes))
    latent_steps = 3 if bundle.variant == "seq" else None
    model = load_checkpoint(bundle.manifest["checkpoint"]["path"])[0]
    reference = sampling.sample_call(model, noise, latent_steps, known=known)
    assert torch.equal(reference.tokens[clamped], known[clamped])
    for head in ("sparse", "dense"):
        steps = list(Sampler.from_bundle(bundle, runners, head=head).steps(noise, latent_steps, known))
        assert all(torch.equal(step.x[clamped], known[clamped]) for step in steps)   # from t = 1 on
        assert torch.equal(steps[-1].x, reference.tokens)
    unprompted = sampling.sample_call(model, noise, latent_steps)
    assert not torch.equal(unprompted.tokens[clamped], known[clamped])   # the clamp did something
    if model.cfg.prompt_latent:   # the latent chain read the prompt (and the runtime's alike)
        assert not torch.allclose(reference.latent, unprompted.latent, atol=1e-3)
        assert torch.allclose(steps[-1].y, reference.latent, atol=1e-5)


def test_start_tokens_checks_what_it_is_given():
    assert torch.equal(start_tokens(torch.tensor([[FREE, 1]]), 1, 2, 5, "cpu"), torch.tensor([[5, 1]]))
    with pytest.raises(PromptError, match=r"int64 \[B, L\] = \[1, 2\]"):
        start_tokens(torch.tensor([[1, 2, 3]]), 1, 2, 5, "cpu")
    with pytest.raises(PromptError, match=r"ids in \[0, 5\) or -1"):
        start_tokens(torch.tensor([[5, 1]]), 1, 2, 5, "cpu")   # the mask id is not a token


def test_seq_latent_candidates_keep_the_one_that_best_explains_the_prompt(bundle_cache):
    """C latent candidates: the runtime (ORT, both heads) and the reference choose the same
    candidate for every sample, and it is the one whose y0 gives the known tokens the highest
    log-likelihood; C = 1 is the plain SEQ chain, and candidates without known tokens are refused."""
    bundle = Bundle.open(cached_tiny_bundle(bundle_cache, "seq"))
    known, C, T_y = known_tokens(bundle), 4, 3
    L, P, D = bundle.shapes["L"], bundle.shapes["P"], bundle.shapes["D"]
    noise = draw_noise(4, B, T, L, (P, D), latent_candidates=C)
    plain = draw_noise(4, B, T, L, (P, D))
    assert np.array_equal(noise.u, plain.u) and np.array_equal(noise.y_init, plain.y_init)   # drawn last
    model = load_checkpoint(bundle.manifest["checkpoint"]["path"])[0]
    steps = []
    reference = sampling.sample_call(model, noise, T_y, known=known, callback=steps.append)
    assert [s.index for s in steps[:C * T_y]] == list(range(C * T_y)) and steps[0].total == C * T_y

    chains = [sampling.sample_call(model, Noise(noise.u, y), T_y, known=known) for y in noise.initial_latents()]
    with torch.no_grad():
        masked = torch.full_like(known, bundle.shapes["mask_id"])
        scores = torch.stack([
            (model.token_denoiser(masked, c.latent, torch.ones(B))[0].gather(-1, known.clamp_min(0)[..., None])[..., 0]
             .double() * (known >= 0)).sum(-1) for c in chains])
    best = scores.argmax(0)
    assert len(set(best.tolist())) > 1                                   # the choice differs by sample
    assert torch.equal(reference.latent, torch.stack([c.latent for c in chains])[best, torch.arange(B)])

    runners = {g: r.activate() for g, r in make_runners(bundle, "ort", "fp32", "cpu", threads=1).items()}
    for head in ("sparse", "dense"):
        ours = Sampler.from_bundle(bundle, runners, head=head).sample(noise, T_y, known=known)
        assert torch.equal(ours.tokens, reference.tokens), head
        assert torch.allclose(ours.latent, reference.latent, atol=1e-5), head
    free = torch.full_like(known, FREE)   # nothing clamped: every candidate scores 0, the first is kept
    assert torch.equal(Sampler.from_bundle(bundle, runners).sample(noise, T_y, known=free).tokens,
                       Sampler.from_bundle(bundle, runners).sample(plain, T_y).tokens)
    with pytest.raises(LddmError, match="without a prompt or template use one"):
        Sampler.from_bundle(bundle, runners).sample(noise, T_y)
    with pytest.raises(LddmError, match="without a prompt or template use one"):
        sampling.sample_call(model, noise, T_y)
    bad = Noise(noise.u, noise.y_init, noise.y_candidates[:, :1])
    with pytest.raises(ShapeMismatch, match=r"y_candidates must have shape \[C - 1, B, P, D\]"):
        sampling.sample_call(model, bad, T_y, known=known)
    with pytest.raises(ShapeMismatch, match=r"y_candidates must have shape \[C - 1, B, P, D\]"):
        Sampler.from_bundle(bundle, runners).sample(bad, T_y, known=known)


# ----------------------------------------------------------------------------- text -> clamped tokens

@pytest.fixture(scope="module")
def encoder() -> PromptEncoder:
    entry = tiny_tokenizer_entry()
    return PromptEncoder(entry, 16, entry["vocab_size"], hole_tokens=3)


def test_prompts_and_templates_become_clamped_tokens(encoder):
    prompt = encoder.prompt("to be or")
    n = sum(k != FREE for k in prompt.known)
    assert len(prompt.known) == 16 and 0 < n < 16 and all(k == FREE for k in prompt.known[n:])
    assert encoder.tokenizer.decode(list(prompt.known[:n])) == "to be or"
    template = encoder.template(f"to {HOLE} not {HOLE}")
    known = list(template.known)
    first = known.index(FREE)
    assert known[first: first + 3] == [FREE] * 3 and known[first + 3] != FREE   # a hole of 3, then text
    assert template.template and not prompt.template


@pytest.mark.parametrize("call,match", [
    (lambda e: e.prompt("to be " * 20), "tokens, but the model samples 16; shorten it"),
    (lambda e: e.prompt(""), "--prompt is empty"),
    (lambda e: e.template("to be or not"), f"--template has no hole; mark each span to fill with {HOLE!r}"),
    (lambda e: e.template(f"{HOLE} {HOLE}"), "--template is only holes"),
    (lambda e: e.template(f"to be {HOLE} " * 5), "with its holes of 3, but the model samples 16"),
])
def test_bad_prompts_are_one_sentence(encoder, call, match):
    with pytest.raises(PromptError, match=match):
        call(encoder)


def test_text_the_tokenizer_cannot_encode_and_a_bundle_without_one_are_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers

    word_level = Tokenizer(models.WordLevel({"to": 0, "be": 1, "[UNK]": 2}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    encoder = PromptEncoder({"json": word_level.to_str()}, 8, 3)
    assert encoder.prompt("to be").known[:2] == (0, 1)
    with pytest.raises(PromptError, match="has text the bundle's tokenizer cannot encode"):
        encoder.prompt("to see")
    with pytest.raises(PromptError, match="trained on synthetic data and has no tokenizer"):
        PromptEncoder(None, 8, 3)


def test_a_prompts_file_names_its_bad_line(encoder, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "to be"}) + "\n\n" + json.dumps({"template": f"to {HOLE} be"}) + "\n")
    assert [p.template for p in encoder.file(path)] == [False, True]
    for bad, match in (("not json", "line 2 of --prompts .* is not JSON"),
                       (json.dumps({"prompt": 3}), "line 2 of --prompts .* is '{\"prompt\": 3}'"),
                       (json.dumps({"prompt": "a", "template": "b"}), "line 2 of --prompts"),
                       (json.dumps({"prompt": "to be " * 20}), "line 2 of --prompts .* tokens")):
        path.write_text(json.dumps({"prompt": "to be"}) + "\n" + bad + "\n")
        with pytest.raises(PromptError, match=match):
            encoder.file(path)
    path.write_text("\n")
    with pytest.raises(PromptError, match="has no prompts"):
        encoder.file(path)


# ----------------------------------------------------------------------------- the sample command

def test_sample_writes_the_prompt_and_the_generated_spans(bundle_cache, tmp_path, capsys):  # noqa: F811
    text = cached_tiny_bundle(bundle_cache, "mdlm", text=True)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "to be"}) + "\n" + json.dumps({"template": f"to {HOLE} or"}) + "\n")
    out = tmp_path / "s.jsonl"
    code, err = run_sample(capsys, "--bundle", text, "--steps", 4, "--num", 3, "--prompts", prompts,
                           "--hole-tokens", 2, "--out", out)
    assert code == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["to be"] * 3 + [f"to {HOLE} or"] * 3
    assert all(r["text"].startswith("to be") and len(r["generated"]) == 1 for r in rows[:3])
    assert all(r["text"].startswith("to") and len(r["generated"]) == 2 for r in rows[3:])   # the hole, the tail


@pytest.mark.parametrize("args,match", [
    (("--prompt", "to be", "--template", f"to {HOLE}"), "pass one of them"),
    (("--prompts", "/nonexistent/p.jsonl"), "--prompts /nonexistent/p.jsonl"),
    (("--template", "to be"), "has no hole"),
])
def test_sample_refuses_bad_prompts_in_one_sentence(bundle_cache, tmp_path, capsys, args, match):  # noqa: F811
    text = cached_tiny_bundle(bundle_cache, "mdlm", text=True)
    code, err = run_sample(capsys, "--bundle", text, "--steps", 2, "--num", 1, *args, "--out", tmp_path / "x.jsonl")
    lines = [line for line in err.splitlines() if line.startswith("lddm-export: error:")]
    assert code == 1 and len(lines) == 1 and match in lines[0] and "Traceback" not in err
    assert not (tmp_path / "x.jsonl").exists()


@pytest.mark.parametrize("variant,args,match", [
    ("mdlm", ("--prompt", "to be"), "--latent-candidates applies to seq bundles only"),
    ("seq", (), "--latent-candidates keeps the latent that best explains the prompt; pass --prompt"),
    ("seq", ("--prompt", "to be"), None),
])
def test_sample_takes_latent_candidates_for_prompted_seq_only(bundle_cache, tmp_path, capsys, variant, args, match):
    out = tmp_path / "x.jsonl"
    code, err = run_sample(capsys, "--bundle", cached_tiny_bundle(bundle_cache, variant, text=True), "--steps", 2,
                           "--num", 2, "--latent-candidates", 3, *args, "--out", out)
    if match is None:
        assert code == 0 and all(json.loads(line)["text"].startswith("to be") for line in out.read_text().splitlines())
        assert "sample seq (ort): 8/8 steps" in err   # 2 token steps + 3 candidates x 2 latent steps
    else:
        assert code == 1 and match in err and "Traceback" not in err and not out.exists()


def test_a_prompt_on_a_bundle_without_a_tokenizer_is_refused(bundle_cache, tmp_path, capsys):  # noqa: F811
    code, err = run_sample(capsys, "--bundle", cached_tiny_bundle(bundle_cache, "seq"), "--steps", 2, "--num", 1,
                           "--prompt", "to be", "--out", tmp_path / "x.jsonl")
    assert code == 1 and "has no tokenizer, so it takes no text prompt" in err and "Traceback" not in err
