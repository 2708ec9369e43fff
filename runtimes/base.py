"""The one backend interface (in the spirit of Polygraphy's BaseRunner).

A runner wraps one exported graph on one backend. `activate()` loads it (builds a session,
deserialises an engine, rebuilds a torch module); `infer(feed)` runs it on a dict of named
torch tensors and returns a dict of named torch tensors on `runner.device`; `deactivate()`
frees it. Runners are context managers. Public methods check state and inputs, then call the
backend's `_activate_impl` / `_infer_impl` / `_deactivate_impl`.

Tensors rather than numpy arrays, so that on a GPU the sampler's arithmetic stays where the
graph's outputs are: a CUDA backend takes and returns CUDA tensors and nothing of size
[B, L, V] crosses to the host in the sampling loop.
"""
from __future__ import annotations

import torch

from runtimes.errors import LddmError
from runtimes.spec import GraphSpec


class Runner:
    """Base class of every backend's runner for one graph.

    Args:
        spec: the graph's input/output spec (from the bundle manifest).
        device: where infer() takes and returns tensors ("cpu" or "cuda[:i]").
        max_batch: the largest batch the backend accepts (an engine profile's max), or None.
    """

    backend = "base"

    def __init__(self, spec: GraphSpec, device: str = "cpu", max_batch: int | None = None):
        self.spec = spec
        self.device = torch.device(device)
        self.max_batch = max_batch
        self.is_active = False

    @property
    def name(self) -> str:
        return f"{self.backend}:{self.spec.name}"

    def activate(self) -> "Runner":
        if not self.is_active:
            self._activate_impl()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self._deactivate_impl()
            self.is_active = False

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    def infer(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run the graph.

        Args:
            feed: input name -> tensor, dtypes and shapes as the spec says (B may vary).
        Returns:
            output name -> tensor (float32), on self.device.
        Raises:
            ShapeMismatch: a missing/extra input, a wrong dtype or shape, a batch over max_batch.
        """
        if not self.is_active:
            raise LddmError(f"runner {self.name} is not active; call activate() or use it as a context manager")
        self.spec.check_feed(feed, self.max_batch)
        return self._infer_impl(feed)

    def _activate_impl(self) -> None:
        raise NotImplementedError

    def _infer_impl(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _deactivate_impl(self) -> None:
        pass
