"""TensorRT engines for a bundle: one strongly typed engine per graph and precision.

The FP16 ONNX graph already says which ops run in FP16 and which stay FP32, so it is built
as a strongly typed network (TensorRT keeps the graph's types instead of choosing its own);
that is the one way that works on both TensorRT 10.x and 11.x:

- TensorRT 11 removed BuilderFlag.FP16/INT8 (and platform_has_fast_fp16): weak typing is
  gone, so the precision lives in the ONNX graph. 10.x still has the flags; they are not used.
- TensorRT 11 removed NetworkDefinitionCreationFlag.EXPLICIT_BATCH (explicit batch has been
  the only mode since 10.0, where the flag was deprecated and ignored); it is not used.
- NetworkDefinitionCreationFlag.STRONGLY_TYPED exists in both (11 deprecates it as always on).

BuilderFlag.TF32 is on by default, strongly typed networks included; it is cleared, so the
FP32 engines and the FP16 engines' FP32 islands compute in FP32, as the reference does.

This module needs only tensorrt, the CUDA driver and onnx (to find a graph's external-data
files for its hash), no torch and no training/: `lddm-export build --bundle DIR --engines on`
runs it on a Jetson.

Engine files are named engines/<graph>.<precision>.<gpu>.trt<version>.plan, where <gpu> is
the slugged GPU name plus its compute capability (e.g. orin-sm87), and each is recorded in
the manifest's "engines" list with what the runner checks before loading it.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable

from runtimes.cuda_util import GpuIdentity, cache_root, gpu_identity, import_tensorrt, onnx_sha256, tensorrt_logger
from runtimes.errors import EngineBuildError
from runtimes.fileio import WriteError, write_atomic
from runtimes.spec import DYNAMIC, GraphSpec, dynamic_profile

ENGINES_OFF = "use --engines off"


def tensorrt_available() -> bool:
    """Whether `import tensorrt` works on this machine (libraries included)."""
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def engine_file_name(graph: str, precision: str, gpu: GpuIdentity, trt_version: str) -> str:
    """The bundle-relative path of one engine, e.g. engines/denoiser.fp16.orin-sm87.trt10.3.0.plan."""
    return f"engines/{graph}.{precision}.{gpu.tag}.trt{trt_version}.plan"


def profile_shapes(tensor: dict, profile: dict) -> tuple[tuple[int, ...], ...]:
    """The optimisation profile's (min, opt, max) shapes of one graph input.

    Args:
        tensor: a graph input as the manifest lists it, {"name", "dtype", "shape"} with "B"
            (or the head's "N") standing for the dynamic axis, e.g. {"name": "x_t", "shape": ["B", 128]}.
        profile: {"min": int, "opt": int, "max": int} of that axis (runtimes.spec.dynamic_profile).
    Returns:
        three shape tuples, e.g. ((1, 128), (8, 128), (64, 128)).
    """
    return tuple(tuple(profile[key] if dim in DYNAMIC else int(dim) for dim in tensor["shape"])
                 for key in ("min", "opt", "max"))


def default_timing_cache(gpu: GpuIdentity, trt_version: str) -> Path:
    """Where the timing cache lives between builds: in cache_root(), one file per GPU and version.

    Not in the bundle: every build writes a fresh bundle directory, and the cache is worth
    keeping across bundles (it holds kernel timings, not the model).
    """
    return cache_root() / f"timing.{gpu.tag}.trt{trt_version}.cache"


def build_engines(bundle_dir: str | Path, manifest: dict, precisions: list[str], profile: dict,
                  workspace_mb: int | None = None, log: Callable[[str], None] = print,
                  timing_cache: str | Path | None = None) -> list[dict]:
    """Build one TensorRT engine per graph and precision from the bundle's ONNX files.

    Args:
        bundle_dir: the bundle directory being written; ONNX files are read from it and the
            engines written to its engines/ folder.
        manifest: the manifest (only "graphs" is read: inputs and ONNX paths per precision).
        precisions: which ONNX graphs to build, e.g. ["fp16"] or ["fp32", "fp16"].
        profile: the batch profile {"min", "opt", "max"}, applied to every input's B axis (the
            head's rows N get runtimes.spec.dynamic_profile of it; the entry records the batch profile).
        workspace_mb: cap on TensorRT's builder workspace in MiB (Jetson), or None for no cap.
        log: progress sink, one line per engine.
        timing_cache: the timing-cache file reused across builds (default_timing_cache()).
    Returns:
        the manifest's "engines" entries: {"graph", "precision", "file", "onnx_file",
        "onnx_sha256", "trt_version", "gpu_name", "compute_capability", "profile"}, where
        "onnx_sha256" is runtimes.cuda_util.onnx_sha256 (external-data files included).
        The caller records the written files in the manifest's "files" table.
    Raises:
        BackendUnavailable: tensorrt does not import, or there is no CUDA GPU.
        EngineBuildError: a bad profile, a missing ONNX graph, a parse or build failure.
    """
    bundle_dir = Path(bundle_dir)
    _check_request(bundle_dir, manifest, precisions, profile, workspace_mb)
    trt = import_tensorrt(ENGINES_OFF)
    gpu = gpu_identity()
    cache_path = Path(timing_cache) if timing_cache else default_timing_cache(gpu, trt.__version__)
    entries = []
    for graph, table in manifest["graphs"].items():
        for precision in precisions:
            onnx_file = table["onnx"][precision]
            engine_file = engine_file_name(graph, precision, gpu, trt.__version__)
            log(f"TensorRT {trt.__version__}: building {engine_file} for {gpu.name} "
                f"(batch {profile['min']}..{profile['max']})")
            axis = dynamic_profile(GraphSpec.from_dict(graph, table), profile, manifest["shapes"]["L"])
            plan = _build_plan(trt, bundle_dir / onnx_file, table["inputs"], axis, workspace_mb, cache_path)
            (bundle_dir / engine_file).parent.mkdir(parents=True, exist_ok=True)
            write_atomic(bundle_dir / engine_file, lambda f: f.write(plan), "the engine file")
            entries.append({"graph": graph, "precision": precision, "file": engine_file,
                            "onnx_file": onnx_file, "onnx_sha256": onnx_sha256(bundle_dir / onnx_file),
                            "trt_version": trt.__version__, "gpu_name": gpu.name,
                            "compute_capability": gpu.compute_capability, "profile": dict(profile)})
    return entries


def _check_request(bundle_dir: Path, manifest: dict, precisions: list[str], profile: dict,
                   workspace_mb: int | None) -> None:
    """Refuse a bad profile, workspace or missing ONNX graph before TensorRT is even imported."""
    if not 1 <= profile["min"] <= profile["opt"] <= profile["max"]:
        raise EngineBuildError(f"batch profile {profile} must satisfy 1 <= min <= opt <= max; "
                               f"pass e.g. --batch 1,8,64")
    if workspace_mb is not None and workspace_mb <= 0:
        raise EngineBuildError(f"the TensorRT workspace cap must be a positive number of MiB, got {workspace_mb}")
    for graph, table in manifest["graphs"].items():
        for precision in precisions:
            onnx_file = table["onnx"].get(precision)
            if onnx_file is None or not (bundle_dir / onnx_file).is_file():
                raise EngineBuildError(f"bundle {bundle_dir} has no {precision} ONNX graph for {graph!r} "
                                       f"to build an engine from; rebuild the bundle with --precision {precision}")


def _build_plan(trt, onnx_path: Path, inputs: list[dict], profile: dict, workspace_mb: int | None,
                cache_path: Path):
    """Parse one ONNX file into a strongly typed network and build it; returns the IHostMemory plan."""
    logger = tensorrt_logger()
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    # parse_from_file (not parse) so that external-data weights next to the file are found.
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT {trt.__version__} could not parse {onnx_path}: {errors}; "
                               f"re-export the graph (lddm-export build --force) or {ENGINES_OFF}")
    config = builder.create_builder_config()
    config.clear_flag(trt.BuilderFlag.TF32)
    if workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    opt_profile = builder.create_optimization_profile()
    for tensor in inputs:
        opt_profile.set_shape(tensor["name"], *profile_shapes(tensor, profile))
    config.add_optimization_profile(opt_profile)
    timing_cache = config.create_timing_cache(_read_cache(cache_path))
    if timing_cache is None or not config.set_timing_cache(timing_cache, ignore_mismatch=False):
        # A corrupt cache file, or one for another device or version: start afresh rather than fail.
        timing_cache = config.create_timing_cache(b"")
        config.set_timing_cache(timing_cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"TensorRT {trt.__version__} failed to build an engine from {onnx_path} "
                               f"(see the TensorRT log above); a larger --workspace-mb or {ENGINES_OFF}")
    data = timing_cache.serialize()
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(cache_path, lambda f: f.write(data), "the TensorRT timing cache")
    except (OSError, WriteError) as e:
        warnings.warn(f"could not save the TensorRT timing cache {cache_path} ({e}); the engine is kept, "
                      f"later builds only take longer (pass a writable timing-cache path)", RuntimeWarning)
    return plan


def _read_cache(path: Path) -> bytes:
    """The timing cache's bytes, or b"" (a fresh cache) when there is none or it cannot be read."""
    try:
        return path.read_bytes()
    except OSError:
        return b""
