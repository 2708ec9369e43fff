"""Metrics: SWD, unigram entropy and generative perplexity (offline AR reference)."""
from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from training.config import PRESETS, ModelConfig
from training.metrics import (ar_perplexity, gpt2_perplexity, sliced_wasserstein, unigram_entropy,
                              wasserstein_1d)
from training.model import LDDM


@pytest.fixture(scope="module")
def samples():
    rng = np.random.default_rng(0)
    return rng.integers(0, 2, (300, 16)).astype(np.float64), rng.integers(0, 2, (300, 16)).astype(np.float64)


# ----------------------------------------------------------------------------- SWD

def test_swd_of_a_set_with_itself_is_zero(samples):
    a, _ = samples
    assert sliced_wasserstein(a, a) == 0.0
    assert sliced_wasserstein(a, np.concatenate([a, a])) == pytest.approx(0.0, abs=1e-12)


def test_swd_is_symmetric_and_positive(samples):
    a, b = samples
    d = sliced_wasserstein(a, b)
    assert d > 0
    assert sliced_wasserstein(b, a) == pytest.approx(d, rel=1e-12)


def test_swd_of_a_translation_is_its_mean_projection(samples):
    a, _ = samples
    shift = np.zeros(a.shape[1])
    shift[3] = 1.0
    directions = np.random.default_rng(0).standard_normal((a.shape[1], 1000))
    directions /= np.linalg.norm(directions, axis=0, keepdims=True)
    distances = [sliced_wasserstein(a, a + c * shift) for c in (0.5, 1.0, 2.0)]
    expected = np.abs(directions[3]).mean()
    np.testing.assert_allclose(distances, [0.5 * expected, expected, 2 * expected], rtol=1e-10)


def test_swd_grows_with_a_shift(samples):
    a, b = samples
    distances = [sliced_wasserstein(a, b + c) for c in (0.0, 0.1, 0.3, 1.0)]
    assert all(x < y for x, y in zip(distances, distances[1:]))


def test_swd_accepts_tensors_and_a_seed(samples):
    a, b = samples
    assert sliced_wasserstein(torch.from_numpy(a).long(), torch.from_numpy(b)) == sliced_wasserstein(a, b)
    assert sliced_wasserstein(a, b, seed=1) != sliced_wasserstein(a, b, seed=0)


def test_w1_with_unequal_sizes_by_hand():
    # quantiles of {0, 1} vs {0, 0.5, 1}: they differ by 0.5 on (1/3, 2/3], so W1 = 1/6.
    a, b = np.array([[0.0], [1.0]]), np.array([[0.0], [0.5], [1.0]])
    np.testing.assert_allclose(wasserstein_1d(a, b), [1 / 6], rtol=1e-12)
    np.testing.assert_allclose(wasserstein_1d(b, a), [1 / 6], rtol=1e-12)


def test_w1_equal_sizes_is_mean_sorted_difference():
    a, b = np.array([[3.0], [0.0], [1.0]]), np.array([[2.0], [5.0], [0.0]])
    np.testing.assert_allclose(wasserstein_1d(a, b), [(0 + 1 + 2) / 3])


def test_swd_rejects_mismatched_dimensions():
    with pytest.raises(ValueError, match="different sizes per sample"):
        sliced_wasserstein(np.zeros((4, 3)), np.zeros((4, 5)))


# ----------------------------------------------------------------------------- entropy

def test_entropy_of_constant_sequences_is_zero():
    assert unigram_entropy(torch.full((3, 10), 7)) == 0.0


def test_entropy_values():
    two_halves = np.array([[0] * 8 + [1] * 8])
    distinct = np.arange(16)[None]
    assert unigram_entropy(two_halves) == pytest.approx(math.log(2))
    assert unigram_entropy(distinct) == pytest.approx(math.log(16))
    # per-sequence entropies are averaged
    assert unigram_entropy(np.concatenate([two_halves, np.zeros((1, 16), int)])) == pytest.approx(math.log(2) / 2)


# ----------------------------------------------------------------------------- generative perplexity

def ar_model(randomise: bool) -> LDDM:
    torch.manual_seed(0)
    model = LDDM(ModelConfig(variant="ar", vocab_size=7, seq_len=12, **PRESETS["tiny"]))
    if randomise:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def test_untrained_ar_model_is_uniform_over_the_vocabulary():
    # zero-initialised head: every data token gets 1/7, the mask ~0, so perplexity = 7
    tokens = torch.randint(0, 7, (5, 12), generator=torch.Generator().manual_seed(0))
    assert ar_perplexity(ar_model(False), tokens) == pytest.approx(7.0, rel=1e-5)


def test_ar_perplexity_is_finite_above_one_and_batch_invariant():
    model = ar_model(True)
    tokens = torch.randint(0, 7, (9, 12), generator=torch.Generator().manual_seed(1))
    ppl = ar_perplexity(model, tokens, batch_size=4)
    assert math.isfinite(ppl) and ppl > 1
    assert ppl == pytest.approx(ar_perplexity(model, tokens, batch_size=9), rel=1e-6)


def test_ar_perplexity_of_scored_positions_is_their_conditional_likelihood():
    # the scored positions' perplexity is exp of their mean NLL given every token before them
    model = ar_model(True)
    tokens = torch.randint(0, 7, (3, 12), generator=torch.Generator().manual_seed(3))
    scored = torch.zeros(3, 12, dtype=torch.bool)
    scored[:, 6:] = True
    with torch.no_grad():
        bos = torch.full((3, 1), model.cfg.mask_id)
        nll = -model.denoiser(torch.cat([bos, tokens[:, :-1]], 1), torch.zeros(3)).double().gather(
            -1, tokens[..., None]).squeeze(-1)
    assert ar_perplexity(model, tokens, scored=scored) == pytest.approx(math.exp(float(nll[:, 6:].mean())), rel=1e-9)
    assert ar_perplexity(model, tokens, scored=torch.ones(3, 12, dtype=torch.bool)) == ar_perplexity(model, tokens)
    with pytest.raises(ValueError, match="at least one position"):
        ar_perplexity(model, tokens, scored=torch.zeros(3, 12, dtype=torch.bool))


def test_ar_perplexity_is_causal():
    # changing the last token must not change the likelihood of the earlier ones
    model = ar_model(True)
    tokens = torch.randint(0, 7, (1, 12), generator=torch.Generator().manual_seed(2))
    other = tokens.clone()
    other[0, -1] = (other[0, -1] + 1) % 7
    with torch.no_grad():
        bos = torch.full((1, 1), model.cfg.mask_id)
        lp_a = model.denoiser(torch.cat([bos, tokens[:, :-1]], 1), torch.zeros(1))
        lp_b = model.denoiser(torch.cat([bos, other[:, :-1]], 1), torch.zeros(1))
    assert torch.equal(lp_a, lp_b)
    assert ar_perplexity(model, tokens) != ar_perplexity(model, other)


def test_ar_perplexity_rejects_bad_input():
    model = ar_model(False)
    with pytest.raises(ValueError, match="needs a model of variant 'ar'"):
        ar_perplexity(LDDM(ModelConfig(variant="mdlm", seq_len=12, **PRESETS["tiny"])), torch.zeros(1, 12))
    with pytest.raises(ValueError, match="tokens must lie in"):
        ar_perplexity(model, torch.full((1, 12), model.cfg.mask_id))
    with pytest.raises(ValueError, match=r"tokens must be \[N, L=12\]"):
        ar_perplexity(model, torch.zeros(1, 5))


@pytest.mark.skipif(importlib.util.find_spec("transformers") is not None, reason="transformers is installed")
def test_gpt2_perplexity_without_transformers_says_what_to_install():
    with pytest.raises(ImportError, match="pip install transformers"):
        gpt2_perplexity(["hello"])


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_gpt2_perplexity_on_a_tiny_local_gpt2(tmp_path):
    """The GPT-2 path end to end on a tiny random GPT-2 saved locally (no hub needed)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    texts = ["the cat sat on the mat", "a dog", "the cat and the dog sat on a mat together"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    tokenizer.save_pretrained(tmp_path)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=bpe.get_vocab_size(), n_positions=64, n_embd=32,
                                       n_layer=1, n_head=2)).eval()
    model.save_pretrained(tmp_path)

    ppl = gpt2_perplexity(texts, model_name=str(tmp_path), batch_size=2, device="cpu")
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:  # one text at a time: no padding involved
            ids = torch.tensor([[tokenizer.eos_token_id] + tokenizer.encode(text)])
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            total -= float(lp.gather(-1, ids[0, 1:, None]).sum())
            count += ids.shape[1] - 1
    assert ppl == pytest.approx(math.exp(total / count), rel=1e-4)
    assert 1 < ppl < 2 * bpe.get_vocab_size()
