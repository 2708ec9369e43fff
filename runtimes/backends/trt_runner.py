"""The native TensorRT backend: a prebuilt engine from the bundle, run with execute_async_v3.

Before an engine is deserialised, its manifest entry must say it was built from this ONNX graph
(runtimes.cuda_util.onnx_sha256 of the bundle's file and its external data, now), by this
TensorRT version and for this GPU's compute capability; otherwise EngineBuildError names what
differs and the rebuild command. Engines are not portable across TensorRT versions or GPU
architectures, and a stale engine would silently compute another graph. Among the engines that
fit, one built on a GPU of this name is preferred; one built on another GPU of the same compute
capability runs, with a warning (TensorRT chose its kernels for that GPU).

Per batch size the runner keeps one execution context, persistent input/output buffers (torch
CUDA tensors, zero-filled) whose addresses are bound once with set_tensor_address, and, with
use_cuda_graph, one CUDA graph captured around execute_async_v3 after a first eager run (TensorRT
does shape-dependent setup on the first enqueue, which must not be captured). A context per
batch size keeps each graph's bound shapes and addresses fixed. The contexts are created
USER_MANAGED and share one scratch buffer of engine.device_memory_size_v2 bytes (they run one at
a time on the runner's stream), rather than one full allocation each. When a CUDA-graph capture
fails, that batch size runs without a graph, with a warning, as trtexec does. infer() copies the
feed into the input buffers and replays; the work runs on the runner's own stream (TensorRT warns
about the legacy default stream), ordered after and before the caller's current stream.
deactivate() waits for that stream before it frees graphs, contexts, scratch and engine.

Aliasing: with clone_outputs=True (the default) infer() returns fresh tensors. With False it
returns the persistent output buffers themselves: they are overwritten by the next infer() with
the same batch size, so use or copy them before that.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from runtimes.base import Runner
from runtimes.bundle import Bundle
from runtimes.cuda_util import GpuIdentity, import_tensorrt, onnx_sha256, tensorrt_logger
from runtimes.errors import BackendUnavailable, EngineBuildError, ShapeMismatch
from runtimes.spec import torch_dtype

TRT_DTYPES = {"float32": "FLOAT", "int64": "INT64"}     # spec dtype -> trt.DataType member


def engine_mismatches(entry: dict, onnx_sha256: str, trt_version: str, compute_capability: str) -> list[str]:
    """What keeps an engine (a manifest "engines" entry) from running here; [] when it fits."""
    problems = []
    if entry["onnx_sha256"] != onnx_sha256:
        problems.append(f"its ONNX file differs ({entry['onnx_file']} now has sha256 {onnx_sha256[:12]}, "
                        f"the engine was built from {entry['onnx_sha256'][:12]})")
    if entry["trt_version"] != trt_version:
        problems.append(f"its TensorRT version differs (built by {entry['trt_version']}, this is {trt_version})")
    if entry["compute_capability"] != compute_capability:
        problems.append(f"its GPU differs (built for {entry['gpu_name']}, compute capability "
                        f"{entry['compute_capability']}; this GPU has {compute_capability})")
    return problems


def select_engine_entry(bundle_root, engines: list[dict], graph: str, precision: str, onnx_sha256: str,
                        trt_version: str, gpu: GpuIdentity) -> dict:
    """The manifest engine entry for (graph, precision) that fits this machine.

    Args:
        bundle_root: the bundle directory (for messages). engines: the manifest's "engines".
        onnx_sha256: onnx_sha256() of the bundle's ONNX graph for graph/precision, as it is now.
        trt_version: tensorrt.__version__ here. gpu: this GPU's name and compute capability.
    Returns:
        the fitting entry built on a GPU of this name, else (with a RuntimeWarning) the first
        fitting entry built on another GPU of the same compute capability.
    Raises:
        EngineBuildError: no engine for the pair, or none that fits (naming what differs).
    """
    rebuild = f"rebuild with `lddm-export build --bundle {bundle_root} --engines on` on this machine"
    candidates = [e for e in engines if e["graph"] == graph and e["precision"] == precision]
    if not candidates:
        raise EngineBuildError(f"bundle {bundle_root} has no {precision} TensorRT engine for graph {graph!r}; {rebuild}")
    fitting, reasons = [], []
    for entry in candidates:
        problems = engine_mismatches(entry, onnx_sha256, trt_version, gpu.compute_capability)
        if problems:
            reasons.append(f"{entry['file']}: " + ", ".join(problems))
        else:
            fitting.append(entry)
    if not fitting:
        raise EngineBuildError(f"the {precision} TensorRT engine for graph {graph!r} does not fit this machine "
                               f"({'; '.join(reasons)}); {rebuild}")
    same_name = [e for e in fitting if e["gpu_name"] == gpu.name]
    if same_name:
        return same_name[0]
    entry = fitting[0]
    warnings.warn(f"TensorRT engine {entry['file']} was built on {entry['gpu_name']}, not on this {gpu.name} "
                  f"(same compute capability {gpu.compute_capability}), so it runs with kernels chosen for the "
                  f"other GPU; {rebuild} for full speed", RuntimeWarning, stacklevel=2)
    return entry


def bind_context(engine, strategy, scratch: torch.Tensor, inputs: dict[str, torch.Tensor],
                 outputs: dict[str, torch.Tensor], graph: str):
    """A new execution context that runs in `scratch`, with the buffers' shapes and addresses bound.

    Args:
        engine: the trt.ICudaEngine. strategy: trt.ExecutionContextAllocationStrategy.USER_MANAGED.
        scratch: the shared device memory, uint8 [n] with n >= engine.device_memory_size_v2.
        inputs, outputs: name -> CUDA tensor of one batch size's concrete shape.
        graph: the graph name, for messages.
    Returns:
        the trt.IExecutionContext.
    Raises:
        EngineBuildError: TensorRT made no context, or refused an output shape or an address.
        ShapeMismatch: the engine's profile does not cover an input's shape.
    """
    context = engine.create_execution_context(strategy)
    if context is None:
        raise EngineBuildError(f"TensorRT could not create an execution context for graph {graph!r} (see its log "
                               f"above); free GPU memory, or rebuild with a smaller --batch MIN,OPT,MAX")
    context.set_device_memory(scratch.data_ptr(), scratch.numel())
    for name, buffer in inputs.items():
        if not context.set_input_shape(name, tuple(buffer.shape)):
            raise ShapeMismatch(f"engine of graph {graph!r} refused input {name!r} of shape {tuple(buffer.shape)}; "
                                f"rebuild with a --batch MIN,OPT,MAX that covers {buffer.shape[0]}")
    for name, buffer in outputs.items():
        if tuple(context.get_tensor_shape(name)) != tuple(buffer.shape):
            raise EngineBuildError(f"engine output {name!r} has shape {tuple(context.get_tensor_shape(name))}, "
                                   f"expected {tuple(buffer.shape)}; rebuild the bundle")
    for name, buffer in {**inputs, **outputs}.items():
        if not context.set_tensor_address(name, buffer.data_ptr()):
            raise EngineBuildError(f"TensorRT refused the device address of tensor {name!r} of graph {graph!r} "
                                   f"(see its log above); rebuild the bundle")
    return context


def capture_graph(context, stream: torch.cuda.Stream, graph: str) -> torch.cuda.CUDAGraph | None:
    """A CUDA graph of one execute_async_v3 on `stream`, or None, with a RuntimeWarning, when the
    capture fails (the engine then runs without a graph, as trtexec does)."""
    cuda_graph = torch.cuda.CUDAGraph()
    caller = torch.cuda.current_stream(stream.device)
    try:
        # Thread-local capture, as trtexec does: other threads' CUDA calls stay legal meanwhile.
        with torch.cuda.graph(cuda_graph, stream=stream, capture_error_mode="thread_local"):
            if context.execute_async_v3(stream.cuda_stream):
                return cuda_graph
        reason = "execute_async_v3 returned False"
    except RuntimeError as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    finally:
        # torch.cuda.graph leaves the capture stream current when its capture_end raises.
        torch.cuda.set_stream(caller)
    warnings.warn(f"TensorRT could not run graph {graph!r} inside a CUDA graph capture ({reason}); "
                  f"running it without CUDA graphs", RuntimeWarning, stacklevel=2)
    return None


@dataclass
class _BatchState:
    context: object                       # trt.IExecutionContext with this batch's shapes bound
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]
    graph: torch.cuda.CUDAGraph | None = None


class TrtRunner(Runner):
    """One graph's TensorRT engine from the bundle.

    Args:
        bundle: the opened bundle (its manifest "engines" entries and files).
        graph: the graph name; precision: "fp16" or "fp32" (which engine).
        device: "cuda" or "cuda:i". use_cuda_graph: replay one CUDA graph per batch size.
        clone_outputs: return copies (True) or the persistent output buffers (see module doc).
    """

    backend = "trt"

    def __init__(self, bundle: Bundle, graph: str, precision: str = "fp16", device: str = "cuda",
                 use_cuda_graph: bool = True, clone_outputs: bool = True):
        super().__init__(bundle.spec(graph), device)
        self.bundle, self.graph, self.precision = bundle, graph, precision
        self.use_cuda_graph, self.clone_outputs = use_cuda_graph, clone_outputs
        self.min_batch = 1
        self._runtime = self._engine = self._stream = self._scratch = self._strategy = None
        self._batches: dict[int, _BatchState] = {}

    def _activate_impl(self) -> None:
        trt = import_tensorrt("use --backend ort")
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise BackendUnavailable(f"the trt backend needs a CUDA GPU, got device {self.device}; "
                                     f"use --device cuda, or --backend ort on the CPU")
        gpu = GpuIdentity(torch.cuda.get_device_name(self.device),
                          "%d.%d" % torch.cuda.get_device_capability(self.device))
        onnx_hash = onnx_sha256(self.bundle.onnx_path(self.graph, self.precision))
        entry = select_engine_entry(self.bundle.root, self.bundle.manifest["engines"], self.graph,
                                    self.precision, onnx_hash, trt.__version__, gpu)
        profile = self.bundle.profile(self.graph, entry["profile"])   # the head's rows: from the batch profile
        self.min_batch, self.max_batch = profile["min"], profile["max"]
        path = self.bundle.root / entry["file"]
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(tensorrt_logger())
            self._engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if self._engine is None:
                raise EngineBuildError(f"TensorRT could not deserialise {path} (see its log above); rebuild "
                                       f"with `lddm-export build --bundle {self.bundle.root} --engines on`")
            self._stream = torch.cuda.Stream(self.device)
            # At least one byte, so that an engine that needs no scratch still gets a real address.
            self._scratch = torch.empty(max(self._engine.device_memory_size_v2, 1), dtype=torch.uint8,
                                        device=self.device)
        self._strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        self._check_io(trt, path)

    def _check_io(self, trt, path) -> None:
        """The engine's I/O names and dtypes are the graph spec's."""
        engine = self._engine
        found = {engine.get_tensor_name(i): engine.get_tensor_dtype(engine.get_tensor_name(i))
                 for i in range(engine.num_io_tensors)}
        wanted = {s.name: getattr(trt.DataType, TRT_DTYPES[s.dtype]) for s in self.spec.inputs + self.spec.outputs}
        if found != wanted:
            raise EngineBuildError(f"engine {path} has I/O {sorted(found)} with dtypes {list(found.values())}, "
                                   f"but graph {self.graph!r} expects {sorted(wanted)}; rebuild the bundle")

    def _infer_impl(self, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = feed[self.spec.inputs[0].name].shape[0]
        if batch < self.min_batch:
            raise ShapeMismatch(f"batch {batch} for graph {self.graph!r} is below the engine profile's "
                                f"minimum {self.min_batch}; rebuild with a smaller --batch MIN,OPT,MAX")
        with torch.cuda.device(self.device):
            state = self._batches.get(batch) or self._prepare(batch)
            for name, buffer in state.inputs.items():
                buffer.copy_(feed[name])
            self._run(state)
            if self.clone_outputs:
                return {name: out.clone() for name, out in state.outputs.items()}
            return dict(state.outputs)

    def _prepare(self, batch: int) -> _BatchState:
        """A context with this batch's shapes and buffers bound, and (optionally) its CUDA graph."""
        inputs = {s.name: torch.zeros(s.concrete_shape(batch), dtype=torch_dtype(s.dtype), device=self.device)
                  for s in self.spec.inputs}
        outputs = {s.name: torch.zeros(s.concrete_shape(batch), dtype=torch_dtype(s.dtype), device=self.device)
                   for s in self.spec.outputs}
        context = bind_context(self._engine, self._strategy, self._scratch, inputs, outputs, self.graph)
        state = _BatchState(context, inputs, outputs)
        self._run(state)
        if self.use_cuda_graph:
            state.graph = capture_graph(context, self._stream, self.graph)
        self._batches[batch] = state
        return state

    def _run(self, state: _BatchState) -> None:
        """Run one batch on the runner's stream, ordered after and before the caller's stream."""
        caller = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(caller)
        with torch.cuda.stream(self._stream):
            if state.graph is not None:
                state.graph.replay()
            else:
                self._enqueue(state.context)
        caller.wait_stream(self._stream)

    def _enqueue(self, context) -> None:
        if not context.execute_async_v3(self._stream.cuda_stream):
            raise EngineBuildError(f"TensorRT failed to run the engine of graph {self.graph!r} (see its log "
                                   f"above); rebuild with `lddm-export build --bundle {self.bundle.root} --engines on`")

    def _deactivate_impl(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()          # nothing may still run in the memory freed below
        # Graphs and contexts go before the scratch they run in and the engine that owns them.
        self._batches.clear()
        self._scratch = self._engine = self._runtime = self._stream = self._strategy = None
