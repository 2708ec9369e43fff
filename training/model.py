"""The LDDM networks: one DiT-style building block, composed into every graph.

Reading order: leaf modules (norm, rotary, time embedding) -> JointBlock, the transformer
block over one or more streams that attend jointly (one stream: MDLM's DiT block; two:
an MM-DiT block) -> the networks (TokenDenoiser, JointDenoiser, LatentDenoiser, Encoder)
-> LDDM, the container a checkpoint holds -> graph wrappers, the exact functions exported
to ONNX.

Conventions: B batch, L tokens, P latent slots, D latent dim, V = vocab + 1 (mask), W width,
H heads. t in [0, 1] with t = 1 pure noise.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from runtimes.spec import GRAPHS_BY_VARIANT as GRAPH_NAMES
from training.config import ModelConfig

MASK_LOGIT_PENALTY = -1e4  # SUBS: the mask token's logit; finite so FP16 and log-softmax stay finite


# ----------------------------------------------------------------------------- leaf modules

class LayerNorm32(nn.Module):
    """LayerNorm without bias, computed in float32 whatever the autocast dtype (as MDLM)."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return F.layer_norm(x.float(), (x.shape[-1],), self.weight.float()).to(x.dtype)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class Rotary(nn.Module):
    """Rotary position embedding over fixed positions: 0..L-1 for one stream, and for joint
    streams the tokens' 0..L-1 followed by the latent slots' positions (joint_positions).

    cos/sin are buffers rather than computed per call, so the exported graph holds them as
    constants and B stays the only dynamic axis.
    """

    def __init__(self, head_dim: int, positions: torch.Tensor, base: float = 10000.0):
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
        angles = positions.float()[:, None] * inv_freq[None]  # (N, hd/2)
        self.register_buffer("cos", angles.cos()[None, None], persistent=False)  # (1, 1, N, hd/2)
        self.register_buffer("sin", angles.sin()[None, None], persistent=False)

    def forward(self, x):  # x: (B, H, N, hd)
        x1, x2 = x.float().chunk(2, dim=-1)
        cos, sin = self.cos[:, :, : x.shape[2]], self.sin[:, :, : x.shape[2]]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features of 1000 t -> MLP (DiT's embedder)."""

    def __init__(self, cond_dim: int, n_freq: int = 256):
        super().__init__()
        self.n_freq = n_freq
        self.mlp = nn.Sequential(nn.Linear(n_freq, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, t):  # t: (B,)
        half = self.n_freq // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device).float() / half)
        args = 1000.0 * t.float()[:, None] * freqs[None]  # (B, half)
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


# ----------------------------------------------------------------------------- the block

class Stream(nn.Module):
    """The per-modality parameters of a joint block: norms, QKV, output projection, MLP, adaLN."""

    def __init__(self, width: int, cond_dim: int, mlp_ratio: int):
        super().__init__()
        self.norm1, self.norm2 = LayerNorm32(width), LayerNorm32(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_ratio * width, width))
        # adaLN-Zero: shift/scale/gate for attention and MLP, zero-initialised so that every
        # block starts as the identity.
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * width))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)


class JointBlock(nn.Module):
    """Transformer block over n streams with one attention over their concatenation.

    n = 1 is MDLM's DiT block; n = 2 is an MM-DiT block (SD3), each modality with its own
    weights but attending to the other.
    """

    def __init__(self, n_streams: int, width: int, heads: int, cond_dim: int, mlp_ratio: int,
                 causal: bool = False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.streams = nn.ModuleList(Stream(width, cond_dim, mlp_ratio) for _ in range(n_streams))

    def forward(self, xs: list[torch.Tensor], c: torch.Tensor, rotary: Rotary) -> list[torch.Tensor]:
        mods = [s.ada(c)[:, None].chunk(6, dim=-1) for s in self.streams]  # 6 x (B, 1, W) per stream
        qkv = torch.cat([s.qkv(modulate(s.norm1(x), m[0], m[1]))
                         for s, x, m in zip(self.streams, xs, mods)], dim=1)  # (B, N, 3W)
        B, N, W3 = qkv.shape
        hd = W3 // (3 * self.heads)
        q, k, v = qkv.view(B, N, 3, self.heads, hd).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, hd)
        q, k = rotary(q), rotary(k)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, H, N, hd)
        o = o.transpose(1, 2).reshape(B, N, W3 // 3)  # (B, N, W)
        out, start = [], 0
        for s, x, m in zip(self.streams, xs, mods):
            o_i = o[:, start:start + x.shape[1]]
            start += x.shape[1]
            x = x + m[2] * s.proj(o_i)
            x = x + m[5] * s.mlp(modulate(s.norm2(x), m[3], m[4]))
            out.append(x)
        return out


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a zero-initialised linear head (DiT)."""

    def __init__(self, width: int, cond_dim: int, out_dim: int):
        super().__init__()
        self.norm = LayerNorm32(width)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * width))
        self.linear = nn.Linear(width, out_dim)
        for p in (self.ada[1].weight, self.ada[1].bias, self.linear.weight, self.linear.bias):
            nn.init.zeros_(p)

    def modulated(self, x, c):
        """The head's input: the normed, adaLN-modulated hidden state (B, N, W)."""
        shift, scale = self.ada(c)[:, None].chunk(2, dim=-1)  # 2 x (B, 1, W)
        return modulate(self.norm(x), shift, scale)

    def forward(self, x, c):
        return self.linear(self.modulated(x, c))


def subs_log_probs(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """SUBS: the mask token is never predicted. Float32 log-softmax with a finite penalty."""
    # Built on the device without indexed assignment: `penalty[mask_id] = c` copies a CPU scalar
    # to the GPU, a synchronising copy that also breaks CUDA-graph capture.
    vocab = torch.arange(logits.shape[-1], device=logits.device)
    penalty = torch.where(vocab == mask_id, MASK_LOGIT_PENALTY, 0.0)
    return torch.log_softmax(logits.float() + penalty, dim=-1)


def head_log_probs(head: FinalLayer, hidden: torch.Tensor, mask_id: int) -> torch.Tensor:
    """The token head after its modulation: hidden (..., W) -> SUBS log-probs (..., V).

    The dense token graphs end in exactly this, so the sparse head (the "head" graph, on the
    rows that unmask) computes what they compute at those rows.
    """
    return subs_log_probs(head.linear(hidden), mask_id)


# ----------------------------------------------------------------------------- networks

class Backbone(nn.Module):
    """Time embedding + a stack of joint blocks over n streams sharing one rotary table."""

    def __init__(self, cfg: ModelConfig, depth: int, n_streams: int, positions: torch.Tensor,
                 causal: bool = False):
        super().__init__()
        self.t_embed = TimestepEmbedder(cfg.cond_dim)
        self.rotary = Rotary(cfg.width // cfg.heads, positions)
        self.blocks = nn.ModuleList(
            JointBlock(n_streams, cfg.width, cfg.heads, cfg.cond_dim, cfg.mlp_ratio, causal)
            for _ in range(depth))

    def forward(self, xs: list[torch.Tensor], t: torch.Tensor):
        c = self.t_embed(t)  # (B, C)
        for block in self.blocks:
            xs = block(xs, c, self.rotary)
        return xs, c


class TokenDenoiser(nn.Module):
    """MDLM's denoiser (and, causal, the AR reference model): x_t, t -> log p(x0 | x_t)."""

    def __init__(self, cfg: ModelConfig, causal: bool = False):
        super().__init__()
        self.mask_id = cfg.mask_id
        self.embed = nn.Embedding(cfg.total_vocab, cfg.width)
        self.backbone = Backbone(cfg, cfg.depth, 1, torch.arange(cfg.seq_len), causal)
        self.head = FinalLayer(cfg.width, cfg.cond_dim, cfg.total_vocab)

    @property
    def token_head(self) -> FinalLayer:  # the name JointDenoiser has (the state_dict keeps "head")
        return self.head

    def hidden(self, x_t, t):  # (B, L) int64, (B,) -> (B, L, W), the head's input
        (h,), c = self.backbone([self.embed(x_t)], t)
        return self.head.modulated(h, c)

    def forward(self, x_t, t):  # -> (B, L, V)
        return head_log_probs(self.head, self.hidden(x_t, t), self.mask_id)


class JointDenoiser(nn.Module):
    """MM-DiT over a token stream and a latent stream.

    FUJI: (x_t, y_t, t) -> (log p(x0 | x_t, y_t), y0_hat), both streams noisy at the same t.
    SEQ token denoiser: (x_t, y0, t) -> log p(x0 | x_t, y0), the latent clean (no latent head).
    """

    def __init__(self, cfg: ModelConfig, latent_head: bool):
        super().__init__()
        self.mask_id = cfg.mask_id
        self.embed = nn.Embedding(cfg.total_vocab, cfg.width)
        self.latent_in = nn.Linear(cfg.latent_dim, cfg.width)
        self.backbone = Backbone(cfg, cfg.depth, 2, joint_positions(cfg))
        self.token_head = FinalLayer(cfg.width, cfg.cond_dim, cfg.total_vocab)
        self.latent_head = FinalLayer(cfg.width, cfg.cond_dim, cfg.latent_dim) if latent_head else None

    def hidden(self, x_t, y, t):  # (B, L), (B, P, D), (B,) -> the token head's input (B, L, W), y0_hat
        (h_x, h_y), c = self.backbone([self.embed(x_t), self.latent_in(y)], t)
        y0_hat = self.latent_head(h_y, c) if self.latent_head is not None else None  # (B, P, D)
        return self.token_head.modulated(h_x, c), y0_hat

    def forward(self, x_t, y, t):  # -> log-probs (B, L, V), y0_hat (B, P, D) or None
        hidden, y0_hat = self.hidden(x_t, y, t)
        return head_log_probs(self.token_head, hidden, self.mask_id), y0_hat


class LatentDenoiser(nn.Module):
    """SEQ's latent denoiser: a DiT over the P latent slots, (y_t, t) -> y0_hat.

    Prompt-aware (cfg.prompt_latent): an MM-DiT over the clamped tokens and the latent slots,
    (y_t, t, clamped) -> y0_hat, where `clamped` holds the prompt's token ids and the mask id at
    every generated position (all mask ids: unprompted). The latent chain then starts from a
    latent consistent with the prompt; it is trained on random clamps (losses.random_clamps).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.prompt_aware, self.mask_id = cfg.prompt_latent, cfg.mask_id
        self.latent_in = nn.Linear(cfg.latent_dim, cfg.width)
        if self.prompt_aware:
            self.embed = nn.Embedding(cfg.total_vocab, cfg.width)
            self.backbone = Backbone(cfg, cfg.latent_depth, 2, joint_positions(cfg))
        else:
            self.backbone = Backbone(cfg, cfg.latent_depth, 1, torch.arange(cfg.n_latent))
        self.head = FinalLayer(cfg.width, cfg.cond_dim, cfg.latent_dim)

    def forward(self, y_t, t, clamped=None):  # (B, P, D), (B,), (B, L) int64 or None -> (B, P, D)
        if not self.prompt_aware:
            (h,), c = self.backbone([self.latent_in(y_t)], t)
        else:
            (_, h), c = self.backbone([self.embed(clamped), self.latent_in(y_t)], t)
        return self.head(h, c)


class Encoder(nn.Module):
    """Tokens -> P latent slots of dimension D, in one of two layouts (cfg.latent_layout).

    "slots": a two-stream DiT over the tokens and P learned slot queries that read them
    through joint attention; each slot may summarise any part of the sequence.
    "chunks": a one-stream DiT over the tokens whose outputs are averaged over P contiguous
    chunks of L / P tokens (LADD's adaptive_chunk_mean pooling); slot i describes chunk i,
    and the denoisers place it at that chunk's centre (joint_positions).

    With unit_norm_latent each slot is projected onto the sphere of radius sqrt(D) (unit RMS
    per coordinate, the scale of the N(0, I) prior), which stops the encoder from inflating
    the latent until it survives the noise at every t.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.unit_norm = cfg.unit_norm_latent
        self.chunks = cfg.latent_layout == "chunks"
        self.n_latent = cfg.n_latent
        self.embed = nn.Embedding(cfg.total_vocab, cfg.width)
        if self.chunks:
            self.backbone = Backbone(cfg, cfg.encoder_depth, 1, torch.arange(cfg.seq_len))
        else:
            self.slots = nn.Parameter(0.02 * torch.randn(1, cfg.n_latent, cfg.width))
            self.backbone = Backbone(cfg, cfg.encoder_depth, 2, torch.arange(cfg.seq_len + cfg.n_latent))
        self.norm = LayerNorm32(cfg.width)
        self.out = nn.Linear(cfg.width, cfg.latent_dim)

    def forward(self, tokens):  # (B, L) -> (B, P, D)
        B, L = tokens.shape
        t = torch.zeros(B, device=tokens.device)  # unconditioned: the adaLN biases are learned
        if self.chunks:
            (h,), _ = self.backbone([self.embed(tokens)], t)
            h = h.view(B, self.n_latent, L // self.n_latent, -1).mean(dim=2)  # (B, P, W)
        else:
            (_, h), _ = self.backbone([self.embed(tokens), self.slots.expand(B, -1, -1)], t)
        y = self.out(self.norm(h)).float()  # (B, P, D)
        if self.unit_norm:
            y = y * (y.shape[-1] ** 0.5) / y.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        return y


def joint_positions(cfg: ModelConfig) -> torch.Tensor:
    """Rotary positions of a joint (tokens, latent) stream: tokens at 0..L-1; latent slots after
    them ("slots") or each at the centre of the chunk it describes ("chunks")."""
    tokens = torch.arange(cfg.seq_len, dtype=torch.float32)
    if cfg.latent_layout == "chunks":
        chunk = cfg.seq_len // cfg.n_latent
        latent = torch.arange(cfg.n_latent, dtype=torch.float32) * chunk + (chunk - 1) / 2
    else:
        latent = cfg.seq_len + torch.arange(cfg.n_latent, dtype=torch.float32)
    return torch.cat([tokens, latent])


# ----------------------------------------------------------------------------- the container

class LDDM(nn.Module):
    """The networks of one variant, as a checkpoint's state_dict holds them.

    mdlm: denoiser | ar: denoiser (causal) | fuji: encoder, denoiser |
    seq: encoder, latent_denoiser, token_denoiser
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.variant in ("mdlm", "ar"):
            self.denoiser = TokenDenoiser(cfg, causal=cfg.variant == "ar")
        elif cfg.variant == "fuji":
            self.encoder = Encoder(cfg)
            self.denoiser = JointDenoiser(cfg, latent_head=True)
        else:
            self.encoder = Encoder(cfg)
            self.latent_denoiser = LatentDenoiser(cfg)
            self.token_denoiser = JointDenoiser(cfg, latent_head=False)


# ----------------------------------------------------------------------------- graph wrappers
# The exact functions exported to ONNX (docs/design.md, "The graphs"): fixed positional signatures,
# tensors in, tensors out.

class EncoderGraph(nn.Module):
    def __init__(self, model: LDDM):
        super().__init__()
        self.encoder = model.encoder

    def forward(self, tokens):
        return self.encoder(tokens)


class FujiDenoiserGraph(nn.Module):
    def __init__(self, model: LDDM):
        super().__init__()
        self.denoiser = model.denoiser

    def forward(self, x_t, y_t, t):
        return self.denoiser(x_t, y_t, t)


class LatentDenoiserGraph(nn.Module):
    def __init__(self, model: LDDM):
        super().__init__()
        self.latent_denoiser = model.latent_denoiser

    def forward(self, y_t, t):
        return self.latent_denoiser(y_t, t)


class PromptLatentDenoiserGraph(LatentDenoiserGraph):
    def forward(self, y_t, clamped, t):
        return self.latent_denoiser(y_t, t, clamped)


class TokenDenoiserGraph(nn.Module):
    def __init__(self, model: LDDM):
        super().__init__()
        self.token_denoiser = model.token_denoiser

    def forward(self, x_t, y0, t):
        return self.token_denoiser(x_t, y0, t)[0]


class MdlmDenoiserGraph(nn.Module):
    def __init__(self, model: LDDM):
        super().__init__()
        self.denoiser = model.denoiser

    def forward(self, x_t, t):
        return self.denoiser(x_t, t)


class MdlmTrunkGraph(nn.Module):
    """The token graphs up to their head's input, hidden (B, L, W); FUJI's also gives y0_hat."""

    def __init__(self, model: LDDM):
        super().__init__()
        self.network = token_network(model)

    def forward(self, x_t, t):
        return self.network.hidden(x_t, t)


class FujiTrunkGraph(MdlmTrunkGraph):
    def forward(self, x_t, y_t, t):
        return self.network.hidden(x_t, y_t, t)


class SeqTrunkGraph(MdlmTrunkGraph):
    def forward(self, x_t, y0, t):
        return self.network.hidden(x_t, y0, t)[0]


class HeadGraph(nn.Module):
    """The token head on gathered rows: hidden (N, W) -> log-probs (N, V)."""

    def __init__(self, model: LDDM):
        super().__init__()
        self.head, self.mask_id = token_network(model).token_head, model.cfg.mask_id

    def forward(self, hidden):
        return head_log_probs(self.head, hidden, self.mask_id)


def token_network(model: LDDM) -> nn.Module:
    """The network whose head gives the token log-probs: the denoiser, or SEQ's token denoiser."""
    return model.token_denoiser if model.cfg.variant == "seq" else model.denoiser


# The torch wrapper of each exported graph; which graphs a variant has, and in what order,
# is runtimes.spec's table.
_WRAPPERS: dict[tuple[str, str], type[nn.Module]] = {
    ("mdlm", "denoiser"): MdlmDenoiserGraph,
    ("fuji", "encoder"): EncoderGraph, ("fuji", "denoiser"): FujiDenoiserGraph,
    ("seq", "encoder"): EncoderGraph, ("seq", "latent_denoiser"): LatentDenoiserGraph,
    ("seq", "token_denoiser"): TokenDenoiserGraph,
    ("mdlm", "trunk"): MdlmTrunkGraph, ("fuji", "trunk"): FujiTrunkGraph, ("seq", "trunk"): SeqTrunkGraph,
    **{(variant, "head"): HeadGraph for variant in ("mdlm", "fuji", "seq")},
}
GRAPHS_BY_VARIANT: dict[str, dict[str, type[nn.Module]]] = {
    variant: {graph: _WRAPPERS[variant, graph] for graph in graphs} for variant, graphs in GRAPH_NAMES.items()}


def graph_modules(model: LDDM) -> dict[str, nn.Module]:
    """The graph name -> wrapper module table of docs/design.md for this model's variant."""
    if model.cfg.variant not in GRAPHS_BY_VARIANT:
        raise ValueError(f"variant {model.cfg.variant!r} has no exported graphs; "
                         f"exportable variants are {sorted(GRAPHS_BY_VARIANT)}")
    wrappers = dict(GRAPHS_BY_VARIANT[model.cfg.variant])
    if model.cfg.prompt_latent:
        wrappers["latent_denoiser"] = PromptLatentDenoiserGraph
    return {name: cls(model).eval() for name, cls in wrappers.items()}
