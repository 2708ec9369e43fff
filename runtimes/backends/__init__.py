"""The backend factory: one Runner per graph of a bundle, for a backend, precision and device.

    runners = make_runners(bundle, "ort", "fp32", "cpu")     # {"denoiser": OrtRunner, ...}

Backends (each imported only when chosen, so a CPU machine imports this module without
onnxruntime-gpu or tensorrt):
    torch    the reference modules from the bundle's checkpoint, built by the caller's `reference`
             loader (training.checkpoint.load_reference_graphs): eager, torch.compile'd, CUDA
             graphs; fp32, or fp16 by autocast on CUDA
    ort      ONNX Runtime: CPU provider on --device cpu, CUDA provider on --device cuda
    ort-trt  ONNX Runtime with its TensorRT execution provider (CUDA runs the nodes TensorRT rejects;
             its FP16 is weakly typed, so native trt is the FP16 path of record)
    trt      native TensorRT engines recorded in the manifest (CUDA only)

Every backend enforces the bundle's batch profile (manifest "batch_profile" max), so a batch
size that runs on one backend runs on all of them, engines included.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from runtimes.base import Runner
from runtimes.bundle import PRECISIONS, Bundle
from runtimes.errors import BackendUnavailable

if TYPE_CHECKING:
    from runtimes.backends.torch_runner import ReferenceLoader

BACKENDS = ("torch", "ort", "ort-trt", "trt")
DEVICES = ("cpu", "cuda", "cuda:N")


def check_device(device: str) -> torch.device:
    """Parse --device; raises BackendUnavailable for an unknown name or a missing GPU."""
    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise BackendUnavailable(f"device {device!r} is unknown; choose one of {', '.join(DEVICES)}")
    parsed = torch.device(device)
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailable(f"device {device} was asked for but torch sees no CUDA GPU on this "
                                     f"machine; use --device cpu")
        if (parsed.index or 0) >= torch.cuda.device_count():
            raise BackendUnavailable(f"device {device} does not exist; this machine has "
                                     f"{torch.cuda.device_count()} CUDA device(s)")
    return parsed


def check_choice(backend: str, precision: str, device: str) -> torch.device:
    """Validate a backend/precision/device triple; returns the parsed device.

    Raises:
        BackendUnavailable: one sentence naming the bad value and the choices.
    """
    if backend not in BACKENDS:
        raise BackendUnavailable(f"backend {backend!r} is unknown; choose one of {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise BackendUnavailable(f"precision {precision!r} is unknown; choose one of {', '.join(PRECISIONS)}")
    parsed = check_device(device)
    if backend == "torch" and precision == "int8":
        raise BackendUnavailable("int8 is the bundle's quantised ONNX graph, which the torch backend (the reference "
                                 "modules) does not run; use --backend ort (or trt on a GPU)")
    if backend == "torch" and precision == "fp16" and parsed.type != "cuda":
        raise BackendUnavailable(f"the torch backend's fp16 is CUDA autocast, got --device {device}; "
                                 f"use --device cuda, or --backend ort for fp16 on the CPU")
    if backend in ("trt", "ort-trt") and parsed.type != "cuda":
        raise BackendUnavailable(f"the {backend} backend runs on a CUDA GPU, got --device {device}; "
                                 f"use --device cuda, or --backend ort on the CPU")
    return parsed


def make_runners(bundle: Bundle, backend: str, precision: str = "fp32", device: str = "cpu",
                 ckpt: str | Path | None = None, graphs: list[str] | None = None,
                 cuda_graph: bool | None = None, threads: int | None = None,
                 compile: bool = False, reference: ReferenceLoader | None = None) -> dict[str, Runner]:
    """One (inactive) Runner per graph of the bundle.

    Args:
        bundle: the opened bundle.
        backend: one of BACKENDS; precision: "fp32" or "fp16"; device: "cpu", "cuda" or "cuda:N".
        ckpt: torch backend only: an explicit checkpoint path (its sha256 must match the manifest).
        graphs: the graphs to make runners for; None for every graph of the bundle.
        cuda_graph: replay CUDA graphs (torch default off, trt default on); None for the default.
        threads: ort on the CPU: intra-op threads per session (None: onnxruntime's default).
        compile: torch backend only: torch.compile the modules (inside the CUDA graph, if any).
        reference: torch backend only, and required there: checkpoint path -> (variant, graph
            modules), e.g. training.checkpoint.load_reference_graphs. The runtime holds no model
            code, so the layer above it passes the loader in.
    Returns:
        graph name -> Runner; activate them (or use them as context managers) before infer(),
        and deactivate them when done: on a GPU each holds its engine or session and buffers.
        With CUDA graphs (torch) and on trt, infer() returns the runner's own output buffers,
        overwritten by its next call at the same batch size (no [B, L, V] copy per step; the
        samplers clone what they keep): clone outputs that must outlive the next call.
    Raises:
        BackendUnavailable: an unknown backend/precision/device, or one this machine lacks;
            the torch backend without `reference`.
    """
    parsed = check_choice(backend, precision, device)
    if compile and backend != "torch":
        raise BackendUnavailable(f"--compile applies to the torch backend only, got --backend {backend}; drop it")
    graphs = bundle.graph_names if graphs is None else graphs
    if backend == "torch":
        from runtimes.backends.torch_runner import CheckpointModules, TorchRunner
        if reference is None:
            raise BackendUnavailable("the torch backend runs the PyTorch reference modules, which the runtime "
                                     "alone does not hold; pass reference=training.checkpoint.load_reference_graphs "
                                     "to make_runners, or choose --backend ort")
        modules = CheckpointModules(bundle, reference, ckpt)
        return {g: TorchRunner(bundle, g, str(parsed), modules, use_cuda_graph=bool(cuda_graph),
                               max_batch=bundle.profile(g)["max"], precision=precision, compile=compile)
                for g in graphs}
    if backend in ("ort", "ort-trt"):
        from runtimes.backends.ort_runner import OrtRunner
        provider = "tensorrt" if backend == "ort-trt" else None
        return {g: OrtRunner(bundle, g, precision, str(parsed), provider, bundle.profile(g)["max"], threads)
                for g in graphs}
    from runtimes.backends.trt_runner import TrtRunner
    return {g: TrtRunner(bundle, g, precision, str(parsed), use_cuda_graph=cuda_graph is not False,
                         clone_outputs=False) for g in graphs}
