"""Model and diffusion configuration: one frozen dataclass, saved into every checkpoint.

The config is the single source of truth for shapes (L, P, D, V) and for the schedule
constants that the exported graphs and the runtime samplers must agree on.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, asdict

VARIANTS = ("mdlm", "fuji", "seq", "ar")
MASK_SCHEDULES = ("linear", "loglinear")
LATENT_SCHEDULES = ("sqrt", "cosine")
LATENT_LAYOUTS = ("slots", "chunks")  # how the encoder's P slots relate to the tokens (model.Encoder)


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent with another."""


@dataclass(frozen=True)
class ModelConfig:
    variant: str = "mdlm"
    vocab_size: int = 2          # data vocabulary; the mask token is appended as id vocab_size
    seq_len: int = 128           # L
    n_latent: int = 4            # P latent slots (fuji, seq)
    latent_dim: int = 8          # D per slot
    width: int = 64
    depth: int = 2               # denoiser blocks
    heads: int = 4
    encoder_depth: int = 1
    latent_depth: int = 1        # seq: blocks of the latent denoiser
    mlp_ratio: int = 4
    cond_dim: int = 32           # width of the time embedding
    mask_schedule: str = "loglinear"
    mask_eps: float = 1e-3       # loglinear: alpha_t = 1 - (1 - eps) t
    latent_schedule: str = "sqrt"
    latent_eps: float = 1e-4     # sqrt: alpha_bar^2 = (1 - 2e) sqrt(1 - t) + e
    unit_norm_latent: bool = True
    latent_layout: str = "slots"
    encoder_input_corruption: float = 0.0  # prob. of masking encoder inputs where x_t is masked
    prompt_latent: bool = False  # seq: the latent denoiser also reads the clamped tokens (model.LatentDenoiser)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{f.name} must be a positive integer, got {value!r}")
            if f.type == "bool" and not isinstance(value, bool):
                raise ConfigError(f"{f.name} must be true or false, got {value!r}")
            if f.type == "float" and (not isinstance(value, (int, float)) or not math.isfinite(value)):
                raise ConfigError(f"{f.name} must be a finite number, got {value!r}")
        checks = [
            (self.variant in VARIANTS, f"variant must be one of {VARIANTS}, got {self.variant!r}"),
            (self.mask_schedule in MASK_SCHEDULES,
             f"mask_schedule must be one of {MASK_SCHEDULES}, got {self.mask_schedule!r}"),
            (self.latent_schedule in LATENT_SCHEDULES,
             f"latent_schedule must be one of {LATENT_SCHEDULES}, got {self.latent_schedule!r}"),
            (self.latent_layout in LATENT_LAYOUTS,
             f"latent_layout must be one of {LATENT_LAYOUTS}, got {self.latent_layout!r}"),
            (self.latent_layout != "chunks" or self.seq_len % self.n_latent == 0,
             f"latent_layout 'chunks' needs seq_len ({self.seq_len}) divisible by n_latent ({self.n_latent})"),
            (self.vocab_size >= 2, f"vocab_size must be >= 2, got {self.vocab_size}"),
            (0.0 < self.mask_eps < 1.0 and 0.0 < self.latent_eps < 0.5,
             f"mask_eps must be in (0, 1) and latent_eps in (0, 0.5), got {self.mask_eps}, {self.latent_eps}"),
            (self.width % self.heads == 0 and (self.width // self.heads) % 2 == 0,
             f"width ({self.width}) must split into heads ({self.heads}) of even size for rotary"),
            (0.0 <= self.encoder_input_corruption <= 1.0,
             f"encoder_input_corruption must be in [0, 1], got {self.encoder_input_corruption}"),
            (not self.prompt_latent or self.variant == "seq",
             f"prompt_latent applies to seq models only, not to {self.variant}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    @property
    def total_vocab(self) -> int:
        """V in the graphs: data vocabulary plus the mask token."""
        return self.vocab_size + 1

    @property
    def has_latent(self) -> bool:
        return self.variant in ("fuji", "seq")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)


# Named size presets (lddm-train --preset; --width, --depth, --heads, --n-latent,
# --latent-dim and --latent-layout override single fields). "tiny" is for tests, "small" for
# the shipped sawtooth examples, "text" for the shipped text examples (sized for about 30-40
# minutes of one CPU core; chunk-pooled latents, because learned slot queries collapsed to a
# constant latent on text: examples/README.md), "base" the ~100M-parameter GPU benchmark
# configuration.
PRESETS: dict[str, dict] = {
    "tiny": dict(width=32, depth=1, heads=2, encoder_depth=1, latent_depth=1, cond_dim=32),
    "small": dict(width=64, depth=2, heads=4, encoder_depth=1, latent_depth=1, cond_dim=32),
    "text": dict(width=128, depth=4, heads=4, encoder_depth=2, latent_depth=2, cond_dim=64,
                 n_latent=16, latent_dim=16, latent_layout="chunks"),
    "base": dict(width=768, depth=12, heads=12, encoder_depth=4, latent_depth=4, cond_dim=128),
}
