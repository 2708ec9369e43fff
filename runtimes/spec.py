"""Graph specs as data: names, dtypes and shapes of every exported graph's inputs and outputs.

One table drives the ONNX export (input/output names, dynamic axes), the TensorRT optimisation
profiles and the runners' input checks. Each graph has one dynamic axis, its first: "B", the
batch, or "N" for the head graph, the rows gathered from a batch (1 to B x L). L, P, D, V and the
width W are fixed per checkpoint. The tolerances of every parity level live in runtimes/tolerances.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from runtimes.errors import ShapeMismatch

BATCH = "B"
ROWS = "N"                # the head graph's rows: the positions of a batch that unmask in one step
DYNAMIC = (BATCH, ROWS)
# The prompt-aware latent denoiser's token input: the clamped token ids, the mask id where generated.
CLAMPED = "clamped"
# The head's TensorRT profile is tuned for rows = opt batch x L / HEAD_OPT_STEPS: one step of a
# 16-step chain unmasks about L / 16 positions per sample.
HEAD_OPT_STEPS = 16


def torch_dtype(name: str):
    """The torch dtype of a spec dtype ("int64", "float32"). torch is imported here, not at
    module level, so the manifest and engine-build path (Jetson: tensorrt, onnx, numpy) can
    read specs without torch."""
    import torch

    return getattr(torch, name)


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                      # "int64" | "float32"
    shape: tuple                    # e.g. ("B", 128); "B" (or "N") is the dynamic axis

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], d["dtype"], tuple(d["shape"]))

    def concrete_shape(self, batch: int) -> tuple[int, ...]:
        """The shape with its dynamic axis ("B" or "N") set to `batch`."""
        return tuple(batch if dim in DYNAMIC else dim for dim in self.shape)


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_dict(self) -> dict:
        return {"inputs": [s.to_dict() for s in self.inputs],
                "outputs": [s.to_dict() for s in self.outputs]}

    @classmethod
    def from_dict(cls, name: str, d: dict) -> "GraphSpec":
        return cls(name, tuple(TensorSpec.from_dict(s) for s in d["inputs"]),
                   tuple(TensorSpec.from_dict(s) for s in d["outputs"]))

    @property
    def dynamic_axis(self) -> str:
        """"B" (a batch of samples) or "N" (the head's gathered rows)."""
        return self.inputs[0].shape[0]

    @property
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def check_feed(self, feed: dict, max_batch: int | None = None) -> int:
        """Check a feed's names, dtypes and shapes against the spec; return its dynamic extent
        (the batch, or the head's rows). max_batch bounds that extent (dynamic_profile's max).

        Raises ShapeMismatch naming the input, what was received and what was expected.
        """
        if set(feed) != set(self.input_names):
            raise ShapeMismatch(f"graph {self.name!r} takes inputs {self.input_names}, "
                                f"got {sorted(feed)}")
        batch = None
        for s in self.inputs:
            x = feed[s.name]
            dtype = str(x.dtype).replace("torch.", "")
            if dtype != s.dtype:
                raise ShapeMismatch(f"input {s.name!r} of graph {self.name!r} must be {s.dtype}, got {dtype}")
            b = x.shape[0] if len(x.shape) else None
            batch = b if batch is None else batch
            if tuple(x.shape) != s.concrete_shape(batch):
                raise ShapeMismatch(f"input {s.name!r} of graph {self.name!r} must have shape "
                                    f"{list(s.concrete_shape(batch))} ({self.dynamic_axis} = {batch}), "
                                    f"got {list(x.shape)}")
        if batch is None or batch < 1:
            raise ShapeMismatch(f"graph {self.name!r} needs a batch of at least 1, got {batch}")
        if max_batch is not None and batch > max_batch and self.dynamic_axis == ROWS:
            raise ShapeMismatch(f"{batch} rows for graph {self.name!r} are above the profile's maximum "
                                f"{max_batch} (the batch maximum times L); use a smaller --batch-size")
        if max_batch is not None and batch > max_batch:
            raise ShapeMismatch(f"batch {batch} for graph {self.name!r} is above the engine profile's "
                                f"maximum {max_batch}; use --batch-size <= {max_batch} or rebuild "
                                f"with a larger --batch MIN,OPT,MAX")
        return batch


# The forms of the samplers' token step: log-probs only at the positions that unmask (the trunk
# and head graphs), or at every position (the dense token graph).
HEADS = ("sparse", "dense")

# The graphs each variant exports, in export order: the one table the exporter, the bundle's
# validator, the samplers and training.model's wrappers take their graph names from.
# "trunk" and "head" are the token network split at its output projection (the sparse head):
# the trunk is the token graph (denoiser, or SEQ's token_denoiser) up to the modulated hidden
# state; the head maps gathered hidden rows to log-probs.
GRAPHS_BY_VARIANT: dict[str, tuple[str, ...]] = {
    "mdlm": ("denoiser", "trunk", "head"),
    "fuji": ("encoder", "denoiser", "trunk", "head"),
    "seq": ("encoder", "latent_denoiser", "token_denoiser", "trunk", "head"),
}


def dynamic_profile(spec: GraphSpec, batch_profile: dict, L: int) -> dict:
    """The {"min", "opt", "max"} of a graph's dynamic axis for a bundle's batch profile:
    the batch profile itself, or for the head's rows 1 .. max x L (opt: opt x L / HEAD_OPT_STEPS)."""
    if spec.dynamic_axis == BATCH:
        return dict(batch_profile)
    return {"min": 1, "opt": max(1, batch_profile["opt"] * L // HEAD_OPT_STEPS), "max": batch_profile["max"] * L}


def graph_specs(variant: str, L: int, P: int, D: int, V: int, W: int,
                prompt_latent: bool = False) -> dict[str, GraphSpec]:
    """The docs/design.md graph table for one variant and its fixed sizes (W: the token network's width).
    prompt_latent: SEQ's latent denoiser also takes the clamped tokens (config.prompt_latent)."""
    if variant not in GRAPHS_BY_VARIANT:
        raise ShapeMismatch(f"variant {variant!r} has no graphs; expected one of {sorted(GRAPHS_BY_VARIANT)}")
    B = BATCH
    tokens = TensorSpec("tokens", "int64", (B, L))
    x_t = TensorSpec("x_t", "int64", (B, L))
    y_t = TensorSpec("y_t", "float32", (B, P, D))
    y0 = TensorSpec("y0", "float32", (B, P, D))
    t = TensorSpec("t", "float32", (B,))
    clamped = TensorSpec(CLAMPED, "int64", (B, L))
    log_probs = TensorSpec("log_probs", "float32", (B, L, V))
    y0_hat = TensorSpec("y0_hat", "float32", (B, P, D))
    latent = TensorSpec("latent", "float32", (B, P, D))
    hidden = TensorSpec("hidden", "float32", (B, L, W))
    token_inputs = {"mdlm": (x_t, t), "fuji": (x_t, y_t, t), "seq": (x_t, y0, t)}[variant]
    io = {"encoder": ((tokens,), (latent,)),
          "denoiser": ((x_t, y_t, t), (log_probs, y0_hat)) if variant == "fuji" else ((x_t, t), (log_probs,)),
          "latent_denoiser": ((y_t, clamped, t) if prompt_latent else (y_t, t), (y0_hat,)),
          "token_denoiser": ((x_t, y0, t), (log_probs,)),
          "trunk": (token_inputs, (hidden, y0_hat) if variant == "fuji" else (hidden,)),
          "head": ((TensorSpec("hidden", "float32", (ROWS, W)),), (TensorSpec("log_probs", "float32", (ROWS, V)),))}
    return {name: GraphSpec(name, *io[name]) for name in GRAPHS_BY_VARIANT[variant]}
