"""The ONNX Runtime backend: one InferenceSession per graph, fed through IO binding.

Execution providers: "cpu" (CPUExecutionProvider), "cuda" (CUDAExecutionProvider) and
"tensorrt" (TensorrtExecutionProvider, with CUDA as the fallback for nodes TensorRT rejects).
onnxruntime and onnxruntime-gpu install the same module; it is imported on activation only.

Inputs and outputs are bound by pointer (IO binding) to torch tensors on the runner's device:
the outputs are allocated by torch from the graph spec's shapes, so on a GPU they stay on the
device and the sampler works on them in place; nothing is copied through numpy. On CUDA the
session runs on torch's current stream (`user_compute_stream`), so no extra synchronisation
is needed between torch's kernels and ORT's.
"""
from __future__ import annotations

import numpy as np
import torch

from runtimes.base import Runner
from runtimes.bundle import Bundle
from runtimes.errors import BackendUnavailable
from runtimes.spec import torch_dtype

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}
NUMPY_DTYPES = {"int64": np.int64, "float32": np.float32}


class OrtRunner(Runner):
    """One exported graph on ONNX Runtime.

    Args:
        bundle: the opened bundle (the ONNX file of `graph` at `precision`, its spec).
        graph: the graph name, e.g. "denoiser".
        precision: "fp32" or "fp16" (which ONNX file; the graph's edges are float32 either way).
        device: "cpu" or "cuda[:i]".
        provider: "cpu", "cuda" or "tensorrt"; None picks "cpu" on the CPU and "cuda" on a GPU.
        max_batch: the largest batch accepted (the bundle's batch profile), or None.
        threads: intra-op threads of the session (CPU), or None for onnxruntime's default.
    """

    backend = "ort"

    def __init__(self, bundle: Bundle, graph: str, precision: str = "fp32", device: str = "cpu",
                 provider: str | None = None, max_batch: int | None = None, threads: int | None = None):
        super().__init__(bundle.spec(graph), device, max_batch)
        self.provider = provider or ("cuda" if self.device.type == "cuda" else "cpu")
        if self.provider not in PROVIDERS:
            raise BackendUnavailable(f"onnxruntime provider {self.provider!r} is unknown; "
                                     f"choose one of {sorted(PROVIDERS)}")
        if (self.provider == "cpu") != (self.device.type == "cpu"):
            raise BackendUnavailable(f"onnxruntime provider {self.provider!r} does not run on device "
                                     f"{self.device}; use the cpu provider with --device cpu, cuda/tensorrt with cuda")
        self.path = bundle.onnx_path(graph, precision)
        self.precision, self.threads = precision, threads
        self.session = None

    def _provider_list(self, ort) -> list:
        available = ort.get_available_providers()
        wanted = PROVIDERS[self.provider]
        if wanted not in available:
            raise BackendUnavailable(f"onnxruntime on this machine lacks {wanted} (it has {available}); "
                                     f"install onnxruntime-gpu for cuda/tensorrt, or use --device cpu")
        if self.provider == "cpu":
            return [wanted]
        cuda = {"device_id": self.device.index or 0,
                "user_compute_stream": str(torch.cuda.current_stream(self.device).cuda_stream)}
        if self.provider == "cuda":
            return [(wanted, cuda)]
        trt = {"device_id": cuda["device_id"], "user_compute_stream": cuda["user_compute_stream"],
               "trt_fp16_enable": self.precision == "fp16", "trt_engine_cache_enable": True,
               "trt_engine_cache_path": str(self.path.parent / "ort_trt_cache")}
        return [(wanted, trt), ("CUDAExecutionProvider", cuda)]

    def _activate_impl(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailable("onnxruntime is not installed; pip install 'lddm-export[cpu]' "
                                     "(or [gpu] for CUDA)") from None
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
        self.session = ort.InferenceSession(str(self.path), options, providers=self._provider_list(ort))

    def _deactivate_impl(self) -> None:
        self.session = None

    def _infer_impl(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device_type = self.device.type
        device_id = self.device.index or 0
        binding = self.session.io_binding()
        # Keep the (possibly copied) contiguous inputs alive until the run has finished.
        inputs = {name: x.to(self.device).contiguous() for name, x in feed.items()}
        for s in self.spec.inputs:
            x = inputs[s.name]
            binding.bind_input(s.name, device_type, device_id, NUMPY_DTYPES[s.dtype], list(x.shape), x.data_ptr())
        batch = inputs[self.spec.input_names[0]].shape[0]
        outputs = {s.name: torch.empty(s.concrete_shape(batch), dtype=torch_dtype(s.dtype), device=self.device)
                   for s in self.spec.outputs}
        for s in self.spec.outputs:
            y = outputs[s.name]
            binding.bind_output(s.name, device_type, device_id, NUMPY_DTYPES[s.dtype], list(y.shape), y.data_ptr())
        self.session.run_with_iobinding(binding)
        return outputs
