"""Sample-quality metrics: sliced Wasserstein distance, unigram entropy, generative perplexity.

- SWD (synthetic data): both sample sets are projected on the same seeded random unit
  directions; the 1-D Wasserstein-1 distances of the projections are averaged.
- Unigram entropy (text): the entropy (nats) of each sequence's token histogram, averaged
  over sequences, as MDLM reports it; low values flag repetitive, degenerate samples.
- Generative perplexity (text): exp of the mean per-token negative log-likelihood of the
  samples under a reference autoregressive model: GPT-2 through `transformers` (imported
  lazily) where the hub is reachable, or offline the project's own AR checkpoint
  (variant "ar") trained on the same tokenizer.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from training.model import LDDM

SWD_DIRECTIONS = 1000
SWD_SEED = 0


# ----------------------------------------------------------------------------- SWD

def _as_float64_matrix(name: str, x) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    a = a.astype(np.float64).reshape(len(a), -1)  # (n, d): every sample flattened to one vector
    if len(a) == 0:
        raise ValueError(f"{name} holds no samples; pass at least one sample per set")
    return a


def wasserstein_1d(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """W1 between the empirical distributions of a and b along axis 0, column by column.

    W1 = integral over q in (0, 1) of |F_a^-1(q) - F_b^-1(q)|. With equal sizes this is the
    mean of |sorted a - sorted b|; otherwise the integral runs over the merged quantile grid,
    on whose pieces both empirical quantile functions are constant.

    Args:
        a: float64 [n, K]; b: float64 [m, K].
    Returns:
        float64 [K], one distance per column.
    """
    a, b = np.sort(a, axis=0), np.sort(b, axis=0)
    n, m = len(a), len(b)
    if n == m:
        return np.abs(a - b).mean(axis=0)
    edges = np.union1d(np.arange(1, n + 1) / n, np.arange(1, m + 1) / m)  # right ends, last is 1
    left = np.concatenate([[0.0], edges[:-1]])
    mid = 0.5 * (left + edges)  # strictly inside each piece, so the floor below is exact
    ia = np.minimum(np.floor(mid * n).astype(np.int64), n - 1)
    ib = np.minimum(np.floor(mid * m).astype(np.int64), m - 1)
    return ((edges - left)[:, None] * np.abs(a[ia] - b[ib])).sum(axis=0)


def sliced_wasserstein(a, b, n_directions: int = SWD_DIRECTIONS, seed: int = SWD_SEED) -> float:
    """Sliced Wasserstein-1 distance between two sample sets.

    Args:
        a: [n, ...] samples (tensor or array; each sample flattened to d numbers, e.g. the
            L tokens of a sawtooth sequence as a point in R^L).
        b: [m, ...] samples of the same d; m may differ from n.
        n_directions: random unit directions in R^d (1000 by default).
        seed: seeds numpy.random.default_rng for the directions, so every call with the
            same seed compares along the same directions.
    Returns:
        The mean over directions of W1 between the projected sets (a Python float, >= 0).
    """
    a, b = _as_float64_matrix("a", a), _as_float64_matrix("b", b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"the two sample sets have different sizes per sample ({a.shape[1]} vs "
                         f"{b.shape[1]}); compare samples of the same shape")
    if n_directions <= 0:
        raise ValueError(f"n_directions must be a positive integer, got {n_directions}")
    directions = np.random.default_rng(seed).standard_normal((a.shape[1], n_directions))
    directions /= np.linalg.norm(directions, axis=0, keepdims=True)  # (d, K) unit columns
    return float(wasserstein_1d(a @ directions, b @ directions).mean())


# ----------------------------------------------------------------------------- entropy

def _as_long_tensor(tokens) -> torch.Tensor:
    return (tokens.detach().cpu() if isinstance(tokens, torch.Tensor) else torch.as_tensor(np.asarray(tokens))).long()


def unigram_entropy(tokens) -> float:
    """Mean over sequences of the entropy (nats) of each sequence's token histogram.

    Args:
        tokens: int [N, L] (tensor or array).
    Returns:
        A Python float in [0, log L]; 0 for sequences that repeat one token.
    """
    x = _as_long_tensor(tokens)
    if x.ndim != 2 or x.numel() == 0:
        raise ValueError(f"tokens must be a non-empty int array [N, L], got shape {tuple(x.shape)}")
    entropies = []
    for row in x:
        _, counts = torch.unique(row, return_counts=True)
        p = counts.double() / counts.sum()
        entropies.append(float(-(p * p.log()).sum()))
    return float(np.mean(entropies))


# ----------------------------------------------------------------------------- generative perplexity

@torch.no_grad()
def ar_perplexity(ar_model: LDDM, tokens, batch_size: int = 64, scored=None) -> float:
    """Generative perplexity under the project's AR checkpoint (offline reference).

    The AR model is a causal TokenDenoiser that reads the mask id as beginning-of-sequence:
    input [mask, x_0 .. x_{L-2}] at t = 0 predicts x_0 .. x_{L-1}.

    Args:
        ar_model: an LDDM of variant "ar" with the samples' vocabulary and length.
        tokens: int [N, L] samples in the AR model's vocabulary (no mask token).
        batch_size: sequences per forward pass.
        scored: bool [N, L], the positions whose likelihood counts (each given every token
            before it: the perplexity of a prompt's continuation, or of filled holes, given the
            text around them up to there); None: every position.
    Returns:
        exp(mean negative log-likelihood per scored token), a Python float >= 1.
    """
    cfg = ar_model.cfg
    if cfg.variant != "ar":
        raise ValueError(f"ar_perplexity needs a model of variant 'ar', got {cfg.variant!r}; "
                         f"train one with lddm-train --variant ar on the same corpus")
    x = _as_long_tensor(tokens)
    if x.ndim != 2 or x.shape[1] != cfg.seq_len or len(x) == 0:
        raise ValueError(f"tokens must be [N, L={cfg.seq_len}] for this AR model, got shape {tuple(x.shape)}")
    if x.min() < 0 or x.max() >= cfg.vocab_size:
        raise ValueError(f"tokens must lie in [0, {cfg.vocab_size}) (the AR model's vocabulary, no mask), "
                         f"got ids in [{int(x.min())}, {int(x.max())}]")
    mask = torch.ones_like(x, dtype=torch.bool) if scored is None else torch.as_tensor(scored, dtype=torch.bool)
    if mask.shape != x.shape or not mask.any():
        raise ValueError(f"scored must be a bool mask of the tokens' shape {tuple(x.shape)} with at least one "
                         f"position, got {tuple(mask.shape)}")
    ar_model.eval()
    device = next(ar_model.parameters()).device
    total_nll = 0.0
    for batch, keep in zip(x.split(batch_size), mask.split(batch_size)):
        batch = batch.to(device)
        bos = torch.full((len(batch), 1), cfg.mask_id, dtype=torch.long, device=device)
        inputs = torch.cat([bos, batch[:, :-1]], dim=1)  # (B, L): shifted right behind BOS
        log_probs = ar_model.denoiser(inputs, torch.zeros(len(batch), device=device))  # (B, L, V)
        nll = -log_probs.double().gather(-1, batch[..., None]).squeeze(-1)
        total_nll += float(nll[keep.to(device)].sum())
    return math.exp(total_nll / int(mask.sum()))


@torch.no_grad()
def gpt2_perplexity(texts: list[str], model_name: str = "gpt2", batch_size: int = 8,
                    device: str | None = None) -> float:
    """Generative perplexity under GPT-2 (needs `transformers` and the Hugging Face hub).

    The decoded samples are retokenized with GPT-2's tokenizer; each text is scored after a
    leading <|endoftext|> (so its first token counts too), truncated to the model's context.

    Args:
        texts: decoded samples (training.data.decode_ids).
        model_name: a causal LM on the hub ("gpt2", "gpt2-large", ...).
        batch_size: texts per forward pass.
        device: torch device; default CUDA when available.
    Returns:
        exp(total NLL / total scored GPT-2 tokens), a Python float >= 1.
    """
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ImportError("generative perplexity under GPT-2 needs the transformers package; "
                          "pip install transformers, or score with an AR checkpoint (ar_perplexity)") from None
    if not texts:
        raise ValueError("texts is empty; pass at least one decoded sample")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    model = AutoModelForCausalLM.from_pretrained(model_name).to(device).eval()
    context = getattr(model.config, "n_positions", None) or model.config.max_position_embeddings
    bos = tokenizer.eos_token_id
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(texts), batch_size):
        encoded = [[bos] + tokenizer.encode(text)[: context - 1] for text in texts[start:start + batch_size]]
        width = max(len(ids) for ids in encoded)
        ids = torch.full((len(encoded), width), bos, dtype=torch.long)
        attention = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, row in enumerate(encoded):
            ids[i, : len(row)] = torch.tensor(row)
            attention[i, : len(row)] = 1
        ids, attention = ids.to(device), attention.to(device)
        logits = model(input_ids=ids, attention_mask=attention).logits.float()  # (B, W, vocab)
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
        target_lp = log_probs.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, W - 1)
        scored = attention[:, 1:].bool()
        total_nll -= float(target_lp[scored].double().sum())
        total_tokens += int(scored.sum())
    if total_tokens == 0:
        raise ValueError("every text is empty after GPT-2 tokenization; pass non-empty decoded samples")
    return math.exp(total_nll / total_tokens)
