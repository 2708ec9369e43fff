"""Graph specs as data: names, dtypes and shapes of every exported graph's inputs and outputs.

One table drives the ONNX export (input/output names, dynamic axes), the TensorRT optimisation
profiles and the runners' input checks. The dimension "B" is the only dynamic axis; L, P, D, V
are fixed per checkpoint. The tolerances of every parity level live in runtimes/tolerances.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from runtimes.errors import ShapeMismatch

BATCH = "B"


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
    shape: tuple                    # e.g. ("B", 128); "B" is the dynamic batch axis

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], d["dtype"], tuple(d["shape"]))

    def concrete_shape(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if dim == BATCH else dim for dim in self.shape)


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
    def input_names(self) -> list[str]:
        return [s.name for s in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [s.name for s in self.outputs]

    def check_feed(self, feed: dict, max_batch: int | None = None) -> int:
        """Check a feed's names, dtypes and shapes against the spec; return its batch size.

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
                                    f"{list(s.concrete_shape(batch))} (B = {batch}), got {list(x.shape)}")
        if batch is None or batch < 1:
            raise ShapeMismatch(f"graph {self.name!r} needs a batch of at least 1, got {batch}")
        if max_batch is not None and batch > max_batch:
            raise ShapeMismatch(f"batch {batch} for graph {self.name!r} is above the engine profile's "
                                f"maximum {max_batch}; use --batch-size <= {max_batch} or rebuild "
                                f"with a larger --batch MIN,OPT,MAX")
        return batch


# The graphs each variant exports, in export order: the one table the exporter, the bundle's
# validator, the samplers and training.model's wrappers take their graph names from.
GRAPHS_BY_VARIANT: dict[str, tuple[str, ...]] = {
    "mdlm": ("denoiser",),
    "fuji": ("encoder", "denoiser"),
    "seq": ("encoder", "latent_denoiser", "token_denoiser"),
}


def graph_specs(variant: str, L: int, P: int, D: int, V: int) -> dict[str, GraphSpec]:
    """The docs/design.md graph table for one variant and its fixed sizes."""
    if variant not in GRAPHS_BY_VARIANT:
        raise ShapeMismatch(f"variant {variant!r} has no graphs; expected one of {sorted(GRAPHS_BY_VARIANT)}")
    B = BATCH
    tokens = TensorSpec("tokens", "int64", (B, L))
    x_t = TensorSpec("x_t", "int64", (B, L))
    y_t = TensorSpec("y_t", "float32", (B, P, D))
    y0 = TensorSpec("y0", "float32", (B, P, D))
    t = TensorSpec("t", "float32", (B,))
    log_probs = TensorSpec("log_probs", "float32", (B, L, V))
    y0_hat = TensorSpec("y0_hat", "float32", (B, P, D))
    latent = TensorSpec("latent", "float32", (B, P, D))
    io = {"encoder": ((tokens,), (latent,)),
          "denoiser": ((x_t, y_t, t), (log_probs, y0_hat)) if variant == "fuji" else ((x_t, t), (log_probs,)),
          "latent_denoiser": ((y_t, t), (y0_hat,)),
          "token_denoiser": ((x_t, y0, t), (log_probs,))}
    return {name: GraphSpec(name, *io[name]) for name in GRAPHS_BY_VARIANT[variant]}
