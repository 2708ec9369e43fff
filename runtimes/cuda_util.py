"""GPU and TensorRT helpers that need no torch: which GPU this is, importing tensorrt, where
caches live, and the hash that ties an engine to its ONNX graph.

The engine-build path on a Jetson must need only tensorrt, onnx and numpy, so the GPU is
queried through the driver library itself (libcuda.so.1, present wherever a CUDA GPU is: on
x86 with the NVIDIA driver, on Jetson under /usr/lib/aarch64-linux-gnu/tegra) with ctypes.
The engine builder (lddm_export.engines) and the TensorRT runner share one TensorRT logger:
TensorRT warns when a process registers two.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from runtimes.bundle import onnx_tensors
from runtimes.errors import BackendUnavailable
from runtimes.fileio import sha256_file

# From cuda.h (CUdevice_attribute); stable since CUDA 2.x.
_CC_MAJOR = 75
_CC_MINOR = 76


@dataclass(frozen=True)
class GpuIdentity:
    """A GPU as the engine manifest records it.

    Attributes:
        name: the driver's device name, e.g. "NVIDIA H100 80GB HBM3" or "Orin".
        compute_capability: "major.minor", e.g. "9.0" or "8.7".
    """

    name: str
    compute_capability: str

    @property
    def tag(self) -> str:
        """A filesystem-safe id for engine file names: the slugged name plus sm<cc>.

        Returns:
            e.g. "nvidia-h100-80gb-hbm3-sm90" or "orin-sm87".
        """
        slug = re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-") or "gpu"
        return f"{slug}-sm{self.compute_capability.replace('.', '')}"


def libcuda() -> ctypes.CDLL | None:
    """The CUDA driver library (libcuda.so.1), or None on a machine without the NVIDIA driver."""
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None


def cuda_driver_version() -> str | None:
    """The CUDA version the installed driver supports ("12.4"), or None without a driver."""
    cuda = libcuda()
    version = ctypes.c_int()
    if cuda is None or cuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return f"{version.value // 1000}.{version.value % 1000 // 10}"


def gpu_identity(index: int = 0) -> GpuIdentity:
    """Query the CUDA driver for device `index`'s name and compute capability.

    Args:
        index: the CUDA device ordinal (as in CUDA_VISIBLE_DEVICES order).
    Returns:
        GpuIdentity of that device.
    Raises:
        BackendUnavailable: no CUDA driver library, or the driver reports no such device.
    """
    cuda = libcuda()
    if cuda is None:
        raise BackendUnavailable("no CUDA driver (libcuda.so.1) on this machine; TensorRT engines "
                                 "need an NVIDIA GPU and its driver, or use --engines off")

    def check(status: int, what: str) -> None:
        if status != 0:
            raise BackendUnavailable(f"the CUDA driver failed {what} for GPU {index} (CUresult {status}); "
                                     f"check nvidia-smi and CUDA_VISIBLE_DEVICES, or use --engines off")

    device = ctypes.c_int()
    name = ctypes.create_string_buffer(256)
    major, minor = ctypes.c_int(), ctypes.c_int()
    check(cuda.cuInit(0), "cuInit")
    check(cuda.cuDeviceGet(ctypes.byref(device), index), "cuDeviceGet")
    check(cuda.cuDeviceGetName(name, len(name), device), "cuDeviceGetName")
    check(cuda.cuDeviceGetAttribute(ctypes.byref(major), _CC_MAJOR, device), "cuDeviceGetAttribute")
    check(cuda.cuDeviceGetAttribute(ctypes.byref(minor), _CC_MINOR, device), "cuDeviceGetAttribute")
    return GpuIdentity(name.value.decode(errors="replace").strip(), f"{major.value}.{minor.value}")


INSTALL_TENSORRT = "install TensorRT (pip install tensorrt on x86, JetPack on Jetson)"


def import_tensorrt(fallback: str):
    """Import tensorrt lazily, turning its absence into one clear sentence.

    Args:
        fallback: what the user can do instead, e.g. "use --engines off".
    Returns:
        the tensorrt module.
    Raises:
        BackendUnavailable: tensorrt is not installed or its libraries do not load.
    """
    try:
        import tensorrt
    except (ImportError, OSError) as e:
        raise BackendUnavailable(f"TensorRT is needed here but `import tensorrt` failed ({e}); "
                                 f"{INSTALL_TENSORRT} or {fallback}") from None
    return tensorrt


@functools.lru_cache(maxsize=None)
def tensorrt_logger():
    """The process's one trt.Logger (warnings and errors go to stderr)."""
    import tensorrt as trt
    return trt.Logger(trt.Logger.WARNING)


def cache_root() -> Path:
    """The per-user cache directory: $XDG_CACHE_HOME/lddm-export, by default ~/.cache/lddm-export.

    TensorRT timing caches and ONNX Runtime's TensorRT-provider caches live here, never in a
    bundle: a bundle's files are hashed into its manifest, and a bundle may be read-only.
    """
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lddm-export"


def onnx_sha256(path: str | Path) -> str:
    """The sha256 of an ONNX graph together with its weights, as hex.

    Returns:
        for a graph with inline weights, the sha256 of the file itself; for one with external
        data, the sha256 of the file's digest followed by each external file's name and digest,
        so that changed weights change the hash.
    """
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    locations = sorted({entry.value for tensor in onnx_tensors(model)
                        for entry in tensor.external_data if entry.key == "location"})
    if not locations:
        return sha256_file(path)
    h = hashlib.sha256(sha256_file(path).encode())
    for location in locations:
        h.update(f"\0{location}\0{sha256_file(path.parent / location)}".encode())
    return h.hexdigest()

