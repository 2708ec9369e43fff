"""The torch backend: the reference graph modules, rebuilt from the checkpoint the bundle records.

The checkpoint is found through the manifest ("checkpoint": {"path", "sha256"}) or given
explicitly; either way its sha256 must be the one recorded, so the reference is the model the
bundle's graphs were exported from. The runtime does not know how to build the PyTorch modules
(runtimes imports nothing above it, docs/design.md): the caller passes a ReferenceLoader,
training.checkpoint.load_reference_graphs, which is called on activation.

On a GPU, `use_cuda_graph=True` captures one CUDA graph per batch size (static input and
output buffers, captured on first use) and replays it: one launch per call instead of one per
kernel, which is what makes small batches fast. `compile=True` runs the module through
torch.compile (inductor, static shapes, no graph breaks) first, so the graph that is captured
holds fused kernels (norm + modulation, rotary, residual gating) instead of one kernel per
elementwise op: at batch 1 the step is bound by the number of kernels, not by arithmetic.

precision "fp16" runs the same modules under torch.autocast(float16): matmuls and attention in
FP16, norms, softmax and the log-softmax head in FP32 (the model computes those in FP32
itself), outputs returned in the spec's FP32. It is torch's counterpart of the bundle's mixed
FP16 graph, not a copy of its islands.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from runtimes.base import Runner
from runtimes.bundle import Bundle
from runtimes.errors import BackendUnavailable, BundleError
from runtimes.fileio import sha256_file
from runtimes.spec import torch_dtype

WARMUP_CALLS = 3  # calls on a side stream before capture (cuBLAS workspaces, lazy init, compilation)

# checkpoint path -> (the model's variant, graph name -> its reference module in eval mode)
ReferenceLoader = Callable[[Path], tuple[str, dict[str, torch.nn.Module]]]


def checkpoint_path(bundle: Bundle, ckpt: str | Path | None = None) -> Path:
    """The checkpoint the torch backend loads, checked against the manifest's sha256.

    Args:
        bundle: the opened bundle.
        ckpt: an explicit checkpoint path (--ckpt), or None to use the path the manifest records.
    Raises:
        BundleError: no such file, or not the checkpoint the bundle was built from.
    """
    recorded = bundle.manifest["checkpoint"] or {}
    want = recorded.get("sha256")
    if ckpt is not None:
        path, source = Path(ckpt), "--ckpt"
    else:
        if not recorded.get("path"):
            raise BundleError(f"bundle {bundle.root} records no checkpoint path; pass --ckpt model.pt "
                              f"for the torch backend")
        path, source = Path(recorded["path"]), "the manifest"
        if not path.is_absolute():
            path = bundle.root / path
    if not path.is_file():
        raise BundleError(f"checkpoint {path} (from {source}) does not exist; pass the bundle's model.pt "
                          f"with --ckpt for the torch backend")
    if want and sha256_file(path) != want:
        raise BundleError(f"checkpoint {path} (from {source}) is not the one bundle {bundle.root} was "
                          f"built from (sha256 differs); pass the original model.pt with --ckpt or rebuild "
                          f"the bundle")
    return path


class CheckpointModules:
    """Lazy loader (shared by a bundle's runners): the graph modules of the recorded checkpoint.

    Args:
        bundle: the opened bundle.
        load: builds the reference modules from a checkpoint file (the caller's, see ReferenceLoader).
        ckpt: an explicit checkpoint path, or None to use the path the manifest records.
    """

    def __init__(self, bundle: Bundle, load: ReferenceLoader, ckpt: str | Path | None = None):
        self.bundle, self.load, self.ckpt = bundle, load, ckpt
        self._modules: dict[str, torch.nn.Module] | None = None

    def __call__(self) -> dict[str, torch.nn.Module]:
        if self._modules is None:
            variant, modules = self.load(checkpoint_path(self.bundle, self.ckpt))
            if variant != self.bundle.variant:
                raise BundleError(f"checkpoint is a {variant} model but bundle {self.bundle.root} "
                                  f"is {self.bundle.variant}; pass the bundle's own model.pt")
            self._modules = modules
        return self._modules


class TorchRunner(Runner):
    """One graph of the reference model, eager or CUDA-graphed.

    Args:
        bundle: the opened bundle (graph spec, checkpoint record, batch profile).
        graph: the graph name, e.g. "denoiser".
        device: "cpu" or "cuda[:i]".
        modules: returns graph name -> reference module when called; a CheckpointModules
            shared by the bundle's runners loads the model once.
        use_cuda_graph: replay one captured CUDA graph per batch size (CUDA devices only).
            The returned tensors are then the graph's static output buffers, overwritten by the
            next call at the same batch size: clone what must outlive it.
        max_batch: the largest batch accepted (the bundle's batch profile), or None.
        precision: "fp32", or "fp16" (autocast).
        compile: run the module through torch.compile (compiled once per batch size, on first use).
    """

    backend = "torch"

    def __init__(self, bundle: Bundle, graph: str, device: str,
                 modules: Callable[[], dict[str, torch.nn.Module]],
                 use_cuda_graph: bool = False, max_batch: int | None = None, precision: str = "fp32",
                 compile: bool = False):
        super().__init__(bundle.spec(graph), device, max_batch)
        if use_cuda_graph and self.device.type != "cuda":
            raise BackendUnavailable(f"CUDA graphs need a CUDA device, got --device {device}; "
                                     f"use --device cuda or turn CUDA graphs off")
        self.graph = graph
        self.modules = modules
        self.use_cuda_graph, self.compile = use_cuda_graph, compile
        self.autocast = torch.autocast(self.device.type, dtype=torch.float16, enabled=precision == "fp16")
        self._out_dtypes = {s.name: torch_dtype(s.dtype) for s in self.spec.outputs}
        self._module: torch.nn.Module | None = None
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict, dict]] = {}

    def _activate_impl(self) -> None:
        module = self.modules()[self.graph].to(self.device).eval()
        self._module = torch.compile(module, fullgraph=True, dynamic=False) if self.compile else module

    def _deactivate_impl(self) -> None:
        self._module, self._graphs = None, {}

    @torch.inference_mode()
    def _run_module(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with self.autocast:
            outputs = self._module(*(feed[name] for name in self.spec.input_names))
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        return {name: out.to(self._out_dtypes[name]) for name, out in zip(self.spec.output_names, outputs)}

    def _infer_impl(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        feed = {name: x.to(self.device) for name, x in feed.items()}
        if not self.use_cuda_graph:
            return self._run_module(feed)
        graph, static_in, static_out = self._captured(feed[self.spec.input_names[0]].shape[0])
        for name, x in feed.items():
            static_in[name].copy_(x)
        graph.replay()
        return dict(static_out)

    def _captured(self, batch: int):
        """The CUDA graph of this batch size, captured on first use."""
        if batch not in self._graphs:
            static_in = {s.name: torch.zeros(s.concrete_shape(batch), dtype=torch_dtype(s.dtype), device=self.device)
                         for s in self.spec.inputs}
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_CALLS):
                    self._run_module(static_in)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = self._run_module(static_in)
            self._graphs[batch] = (graph, static_in, static_out)
        return self._graphs[batch]
