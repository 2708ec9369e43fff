"""Every TensorRT Python name the project uses exists in TensorRT 10.3 (JetPack 6) and 11.x.

TensorRT does not install here (no CPU wheels), but PyPI's tensorrt-cu12-bindings wheels (about
1.2 MB) hold the Python module, tensorrt.so, whose pybind11 registrations keep every class,
method, property and enum member name as a NUL-terminated string; module-level helpers and
__version__ are in the wheel's __init__.py. The linker merges a string into the tail of a longer
one ("num_errors" lives inside "get_num_errors\\0"), so a name is found when it is followed by
NUL; a name TensorRT dropped (EXPLICIT_BATCH in 11) is then absent, as the last tests show.

The names come from the code: attribute chains on the `trt` module, and attribute accesses on
the variables that hold TensorRT objects (TRT_OBJECTS, a reviewed list of the names the code
gives them). The collected set must equal REVIEWED_NAMES, so a new TensorRT call fails this
test until someone adds it here, where it is then checked against every wheel.
"""
from __future__ import annotations

import ast
import re
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from runtimes.backends.trt_runner import TRT_DTYPES

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("lddm_export/engines.py", "runtimes/backends/trt_runner.py", "runtimes/cuda_util.py")
# 10.3: JetPack 6 (Jetson Orin); 11.0: the first release without weak typing; 11.4: the newest here.
WHEELS = ("10.3.0", "11.0.0.114", "11.4.0.106")

# Variables (or self attributes, leading "_" dropped) that hold TensorRT objects in SOURCES.
TRT_OBJECTS = {"builder", "network", "parser", "config", "opt_profile", "timing_cache",
               "runtime", "engine", "context"}

REVIEWED_NAMES = {
    # module level
    "__version__", "Builder", "OnnxParser", "Runtime", "Logger", "WARNING",
    "NetworkDefinitionCreationFlag", "STRONGLY_TYPED", "MemoryPoolType", "WORKSPACE", "DataType",
    # IBuilder, OnnxParser, IBuilderConfig, IOptimizationProfile, ITimingCache
    "create_network", "create_builder_config", "create_optimization_profile",
    "build_serialized_network", "parse_from_file", "num_errors", "get_error",
    "set_memory_pool_limit", "add_optimization_profile", "set_shape",
    "create_timing_cache", "set_timing_cache", "serialize",
    # Runtime, ICudaEngine, IExecutionContext
    "deserialize_cuda_engine", "num_io_tensors", "get_tensor_name", "get_tensor_dtype",
    "create_execution_context", "set_input_shape", "get_tensor_shape", "set_tensor_address",
    "execute_async_v3",
}


def _root_and_chain(node: ast.AST) -> tuple[str | None, list[str]]:
    """For a.b.c return ("a", ["b", "c"]); the root of self._engine.x is "engine"."""
    chain = []
    while isinstance(node, ast.Attribute):
        chain.append(node.attr)
        node = node.value
    chain.reverse()
    if isinstance(node, ast.Name):
        if node.id == "self" and chain:
            return chain[0].lstrip("_"), chain[1:]
        return node.id, chain
    return None, chain


def tensorrt_names_in(tree: ast.AST) -> set[str]:
    """The TensorRT attribute names accessed in one parsed file (see the module docstring)."""
    names = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        root, chain = _root_and_chain(node)
        if root == "trt":
            names.update(chain)                                 # trt.MemoryPoolType.WORKSPACE
        elif root in TRT_OBJECTS and chain:
            names.add(chain[0])                                 # config.set_timing_cache, self._engine.x
        elif isinstance(node.value, ast.Attribute) and node.value.attr.lstrip("_") in TRT_OBJECTS:
            names.add(node.attr)                                # state.context.execute_async_v3
    return names


def used_tensorrt_names() -> set[str]:
    names = set()
    for rel in SOURCES:
        names |= tensorrt_names_in(ast.parse((ROOT / rel).read_text(), rel))
    return names


def test_the_collected_names_are_the_reviewed_list():
    found = used_tensorrt_names()
    assert found == REVIEWED_NAMES, (f"new TensorRT names to review and add: {sorted(found - REVIEWED_NAMES)}; "
                                     f"no longer used: {sorted(REVIEWED_NAMES - found)}")


def test_the_collector_sees_every_kind_of_access():
    code = ("x = trt.A.B\nself._engine.c()\nstate.context.d(1)\nconfig.e = 1\n"
            "torch.cuda.synchronize()\nnot_trt.f\nself.max_batch\n")
    assert tensorrt_names_in(ast.parse(code)) == {"A", "B", "c", "d", "e"}


# --- the wheels

def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def bindings(request, tmp_path_factory) -> dict[str, tuple[bytes, str]]:
    """version -> (tensorrt.so bytes, __init__.py text), wheels cached in pytest's cache dir
    (in a temporary one when the cache plugin is off, `-p no:cacheprovider`)."""
    if hasattr(request.config, "cache"):
        cache = Path(request.config.cache.mkdir("tensorrt-cu12-bindings"))
    else:
        cache = tmp_path_factory.mktemp("tensorrt-cu12-bindings")
    out = {}
    for version in WHEELS:
        found = sorted(cache.glob(f"tensorrt_cu12_bindings-{version}-*.whl"))
        if not found:
            if not _pypi_reachable():
                pytest.skip(f"PyPI is unreachable, so the tensorrt-cu12-bindings {version} wheel "
                            f"cannot be downloaded to check the TensorRT names")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--python-version", "3.10", "--implementation", "cp",
                   "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux_2_28_x86_64",
                   "--timeout", "30", "--retries", "2", "-d", str(cache),
                   f"tensorrt-cu12-bindings=={version}"]
            done = subprocess.run(cmd, capture_output=True, text=True)
            assert done.returncode == 0, f"pip download failed although PyPI is reachable:\n{done.stderr}"
            found = sorted(cache.glob(f"tensorrt_cu12_bindings-{version}-*.whl"))
        with zipfile.ZipFile(found[0]) as wheel:
            out[version] = (wheel.read("tensorrt_bindings/tensorrt.so"),
                            wheel.read("tensorrt_bindings/__init__.py").decode())
    return out


def has_name(binding: tuple[bytes, str], name: str) -> bool:
    """Whether a TensorRT Python name exists in this wheel (see the module docstring)."""
    so, init = binding
    return (name.encode() + b"\0") in so or re.search(rf"^(def {name}\(|{name}\s*=)", init, re.M) is not None


@pytest.mark.parametrize("version", WHEELS)
def test_every_used_name_exists_in_the_bindings(bindings, version):
    wanted = REVIEWED_NAMES | set(TRT_DTYPES.values())       # getattr(trt.DataType, ...) members
    missing = sorted(n for n in wanted if not has_name(bindings[version], n))
    assert not missing, f"TensorRT {version} lacks {missing}"


@pytest.mark.parametrize("version", WHEELS)
def test_the_check_fails_for_names_that_do_not_exist(bindings, version):
    assert not has_name(bindings[version], "build_engine_from_dreams")
    assert not has_name(bindings[version], "set_input_shapes_v7")


def test_the_check_sees_what_tensorrt_11_removed(bindings):
    """The API differences this project avoids: present in 10.3, gone in 11.x."""
    removed_in_11 = ["EXPLICIT_BATCH", "FP16", "platform_has_fast_fp16", "device_memory_size"]
    for name in removed_in_11:
        assert has_name(bindings["10.3.0"], name), name
        assert not has_name(bindings["11.0.0.114"], name), name
        assert not has_name(bindings["11.4.0.106"], name), name
