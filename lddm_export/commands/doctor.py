"""`lddm-export doctor`: what this machine has, and what it can build and run.

Every probe is guarded: a Jetson without torch, or a CPU box without TensorRT, gets a report,
never a traceback.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import platform
import sys
from pathlib import Path

import click

from lddm_export.commands.inspect import table

TEGRA_RELEASE = Path("/etc/nv_tegra_release")


def _module(name: str):
    """The imported module, or the one-line reason it does not import."""
    try:
        return importlib.import_module(name)
    except Exception as e:  # ImportError, or OSError from a missing shared library
        return f"not available ({type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''})"


def jetpack_release(path: Path = TEGRA_RELEASE) -> str | None:
    """The L4T release line of a Jetson ("R36 (release), REVISION: 3.0, ..."), or None elsewhere."""
    if not path.is_file():
        return None
    first = path.read_text(errors="replace").splitlines()[0] if path.stat().st_size else ""
    return first.lstrip("# ").strip() or "present but empty"


def probe() -> tuple[list[list[str]], list[list[str]]]:
    """What is installed, and what that allows.

    Returns:
        (versions rows [component, what], capabilities rows [task, yes/no and why]).
    """
    from runtimes.cuda_util import cuda_driver_version, gpu_identity
    from runtimes.errors import BackendUnavailable

    rows = [["python", f"{platform.python_version()} ({platform.machine()}, {sys.platform})"]]
    mods = {name: _module(name) for name in ("torch", "onnx", "onnxscript", "onnxslim", "onnxruntime", "tensorrt",
                                             "pytriton")}
    ok = {name: not isinstance(m, str) for name, m in mods.items()}
    torch = mods["torch"]
    torch_cuda = ok["torch"] and torch.cuda.is_available()
    if ok["torch"]:
        rows.append(["torch", f"{torch.__version__} (CUDA build {torch.version.cuda or 'none'}, "
                              f"cuda available: {torch_cuda})"])
    else:
        rows.append(["torch", mods["torch"]])
    for name in ("onnx", "onnxscript", "onnxslim", "tensorrt"):
        rows.append([name, mods[name].__version__ if ok[name] else mods[name]])
    rows.append(["pytriton", importlib.metadata.version("nvidia-pytriton") if ok["pytriton"] else mods["pytriton"]])
    providers = mods["onnxruntime"].get_available_providers() if ok["onnxruntime"] else []
    rows.append(["onnxruntime", f"{mods['onnxruntime'].__version__} (providers: {', '.join(providers)})"
                 if ok["onnxruntime"] else mods["onnxruntime"]])
    driver = cuda_driver_version()
    rows.append(["CUDA driver", f"supports CUDA {driver}" if driver else "none (no libcuda.so.1)"])
    try:
        gpu = gpu_identity()
        rows.append(["GPU", f"{gpu.name} (compute capability {gpu.compute_capability})"])
    except BackendUnavailable as e:
        gpu = None
        rows.append(["GPU", f"none ({e})"])
    jetpack = jetpack_release()
    rows.append(["JetPack (L4T)", jetpack or f"not a Jetson ({TEGRA_RELEASE} absent)"])

    from lddm_export.serve import ServeError, python_library_dir
    try:
        python_library_dir()
        libpython = None
    except ServeError as e:
        libpython = str(e)

    def can(yes: bool, why_not: str) -> str:
        return "yes" if yes else f"no: {why_not}"

    export = ok["torch"] and ok["onnx"] and ok["onnxscript"] and ok["onnxslim"]
    caps = [
        ["export bundles (lddm-export build --ckpt)", can(export, "needs torch, onnx, onnxscript and onnxslim")],
        ["check FP16 graphs / run on the CPU (onnxruntime)",
         can("CPUExecutionProvider" in providers, "pip install onnxruntime (the `cpu` extra)")],
        ["run on the GPU with onnxruntime (CUDA)",
         can("CUDAExecutionProvider" in providers, "needs onnxruntime-gpu and a CUDA GPU")],
        ["run through onnxruntime's TensorRT provider",
         can("TensorrtExecutionProvider" in providers, "needs onnxruntime-gpu built with TensorRT")],
        ["build TensorRT engines (--engines on)",
         can(ok["tensorrt"] and gpu is not None, "needs tensorrt and a CUDA GPU")],
        ["run the torch reference on the GPU", can(torch_cuda, "needs a CUDA build of torch and a GPU")],
        ["serve on Triton (lddm-export serve)", can(ok["pytriton"] and libpython is None,
                                                    libpython or "pip install 'lddm-export[serve]'")],
    ]
    return rows, caps


@click.command(help="Show what this machine has (torch, onnx, onnxruntime, TensorRT, CUDA, GPU, JetPack) "
                    "and what it can build and run.")
def command():
    rows, caps = probe()
    click.echo(table(rows, ["component", "version"]))
    click.echo("")
    click.echo(table(caps, ["task", "possible here"]))
