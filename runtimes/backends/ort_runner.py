"""The ONNX Runtime backend: one InferenceSession per graph, fed through IO binding.

Execution providers: "cpu" (CPUExecutionProvider), "cuda" (CUDAExecutionProvider) and
"tensorrt" (TensorrtExecutionProvider, with CUDA running the nodes TensorRT rejects).
onnxruntime and onnxruntime-gpu install the same module; it is imported on activation only.
The provider options used here need onnxruntime-gpu 1.18 or newer (use_tf32, and
user_compute_stream for the TensorRT provider).

ONNX Runtime falls back to the next provider, with a warning only, when one cannot be created,
so after creating the session the runner checks that the provider it asked for came first.

Inputs and outputs are bound by pointer (IO binding) to torch tensors on the runner's device:
the outputs are allocated by torch from the graph spec's shapes, so on a GPU they stay on the
device and the sampler works on them in place; nothing is copied through numpy. On CUDA the
session runs on the runner's own stream (`user_compute_stream`, never 0: 0 means "none" to the
CUDA provider but the legacy default stream to the TensorRT provider), ordered after and before
the caller's current stream. The CUDA provider runs with TF32 off (`use_tf32=0`), so FP32 stays
FP32. The TensorRT provider has no such option: it computes FP32 in TF32 on Ampere and newer
unless NVIDIA_TF32_OVERRIDE=0 is set, and with `trt_fp16_enable` it builds a weakly typed
network, free to run the FP16 graph's FP32 islands in FP16; native `trt` is the FP16 path of record.
Its engine and timing caches live in the user's cache directory (runtimes.cuda_util.cache_root),
not in the bundle, and its optimisation profile is the bundle's batch profile.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch

from runtimes.base import Runner
from runtimes.bundle import Bundle
from runtimes.cuda_util import cache_root, onnx_sha256
from runtimes.errors import BackendUnavailable
from runtimes.spec import GraphSpec, torch_dtype

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
             "tensorrt": "TensorrtExecutionProvider"}
NUMPY_DTYPES = {"int64": np.int64, "float32": np.float32}


def trt_profile_options(spec: GraphSpec, profile: dict) -> dict[str, str]:
    """The TensorRT provider's optimisation profile for a profile {"min", "opt", "max"} of the
    graph's dynamic axis (Bundle.profile).

    Returns:
        e.g. {"trt_profile_min_shapes": "x_t:1x128,t:1", "trt_profile_opt_shapes": "x_t:8x128,t:8",
        "trt_profile_max_shapes": "x_t:64x128,t:64"}: every input, its B axis at that batch size.
    """
    return {f"trt_profile_{key}_shapes": ",".join(
        f"{s.name}:" + "x".join(str(dim) for dim in s.concrete_shape(profile[key])) for s in spec.inputs)
        for key in ("min", "opt", "max")}


def ort_trt_cache_dir(onnx_path: Path) -> Path:
    """The TensorRT provider's engine-cache directory for one ONNX graph: cache_root()/ort-trt/<hash>.

    Keyed by the graph's content, because the provider's own cache key hashes the model's file
    name and node names but not its weights.
    """
    return cache_root() / "ort-trt" / onnx_sha256(onnx_path)[:16]


class OrtRunner(Runner):
    """One exported graph on ONNX Runtime.

    Args:
        bundle: the opened bundle (the ONNX file of `graph` at `precision`, its spec, its batch profile).
        graph: the graph name, e.g. "denoiser".
        precision: "fp32" or "fp16" (which ONNX file; the graph's edges are float32 either way).
        device: "cpu" or "cuda[:i]".
        provider: "cpu", "cuda" or "tensorrt"; None picks "cpu" on the CPU and "cuda" on a GPU.
        max_batch: the largest batch (or head rows) accepted (Bundle.profile's max), or None.
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
        self.profile = bundle.profile(graph)
        self.session = self._stream = None

    def provider_options(self, stream: int | None) -> list:
        """The `providers` argument of InferenceSession.

        Args:
            stream: the handle of the CUDA stream the session runs on (not 0); None on the CPU.
        Returns:
            e.g. [("CUDAExecutionProvider", {"device_id": 0, "use_tf32": 0, "user_compute_stream": "9371..."})].
        """
        if self.provider == "cpu":
            return ["CPUExecutionProvider"]
        cuda = {"device_id": self.device.index or 0, "user_compute_stream": str(stream), "use_tf32": 0}
        if self.provider == "cuda":
            return [("CUDAExecutionProvider", cuda)]
        cache = ort_trt_cache_dir(self.path)
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BackendUnavailable(f"cannot create the TensorRT-provider cache {cache} ({e}); "
                                     f"set XDG_CACHE_HOME to a writable directory") from None
        trt = {"device_id": cuda["device_id"], "user_compute_stream": cuda["user_compute_stream"],
               "trt_fp16_enable": self.precision == "fp16", "trt_engine_cache_enable": True,
               "trt_engine_cache_path": str(cache), "trt_timing_cache_enable": True,
               "trt_timing_cache_path": str(cache.parent), **trt_profile_options(self.spec, self.profile)}
        return [("TensorrtExecutionProvider", trt), ("CUDAExecutionProvider", cuda)]

    def _activate_impl(self) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailable("onnxruntime is not installed; pip install 'lddm-export[cpu]' "
                                     "(or [gpu] for CUDA)") from None
        wanted = PROVIDERS[self.provider]
        available = ort.get_available_providers()
        if wanted not in available:
            raise BackendUnavailable(f"onnxruntime on this machine lacks {wanted} (it has {available}); "
                                     f"install onnxruntime-gpu for cuda/tensorrt, or use --device cpu")
        if self.provider == "tensorrt" and self.precision == "fp32" and os.environ.get("NVIDIA_TF32_OVERRIDE") != "0":
            warnings.warn("onnxruntime's TensorRT provider computes FP32 in TF32 on Ampere and newer GPUs; "
                          "set NVIDIA_TF32_OVERRIDE=0 before starting Python for FP32 results", RuntimeWarning)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
        providers = self.provider_options(self._stream.cuda_stream if self._stream is not None else None)
        session = ort.InferenceSession(str(self.path), options, providers=providers)
        got = session.get_providers()
        if not got or got[0] != wanted:
            raise BackendUnavailable(f"onnxruntime could not start {wanted} for {self.path.name} and fell back to "
                                     f"{got} (see its warnings above); install the CUDA, cuDNN and TensorRT "
                                     f"libraries onnxruntime-gpu {ort.__version__} needs, or use another --backend")
        self.session = session

    def _deactivate_impl(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()
        self.session = self._stream = None

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
        if self._stream is None:
            self.session.run_with_iobinding(binding)
            return outputs
        caller = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(caller)
        self.session.run_with_iobinding(binding)
        caller.wait_stream(self._stream)
        return outputs
