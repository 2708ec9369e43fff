"""Every TensorRT Python call the project makes exists, on the class that owns it and with the
keyword names it passes, in TensorRT 10.3 (JetPack 6), 11.0 and 11.4.

TensorRT does not install here (no CPU wheels), but PyPI's tensorrt-cu12-bindings wheels (about
1.2 MB) hold the real Python module, tensorrt.so. It needs only a few C entry points of
libnvinfer, libnvonnxparser and libnvinfer_plugin, none of them called on import, so with stub
libraries that define them (built here by the C compiler) the module imports in a subprocess on
any x86-64 Linux machine. pybind11 then lists every class and its members, tells a method from
a property or an enum value, and gives each method's signatures with their parameter names.
Names are compared whole, per class: `serialize` does not exist because `deserialize_cuda_engine`
does. Module-level helpers and __version__ are read from the wheel's __init__.py.

The uses come from the code: attribute chains on the `trt` module, and attributes and calls on
the variables that hold TensorRT objects (TRT_OBJECTS maps the names the code gives them to
their classes). The collected set of "Owner.member" must equal REVIEWED, so a new TensorRT call
fails this test until someone adds it here, where it is then checked against every wheel.
"""
from __future__ import annotations

import ast
import json
import platform
import re
import shutil
import socket
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from runtimes.backends.trt_runner import TRT_DTYPES

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("lddm_export/engines.py", "runtimes/backends/trt_runner.py", "runtimes/cuda_util.py")
# 10.3: JetPack 6 (Jetson Orin); 11.0: the first release without weak typing; 11.4: the newest here.
WHEELS = ("10.3.0", "11.0.0.114", "11.4.0.106")

# Variables (or self attributes, leading "_" dropped) that hold TensorRT objects in SOURCES.
TRT_OBJECTS = {"builder": "Builder", "network": "INetworkDefinition", "parser": "OnnxParser",
               "config": "IBuilderConfig", "opt_profile": "IOptimizationProfile",
               "timing_cache": "ITimingCache", "runtime": "Runtime", "engine": "ICudaEngine",
               "context": "IExecutionContext"}

REVIEWED = {
    # module level, and the enum values and constants read from its classes
    "trt.__version__", "trt.Builder", "trt.OnnxParser", "trt.Runtime", "trt.Logger", "Logger.WARNING",
    "trt.NetworkDefinitionCreationFlag", "NetworkDefinitionCreationFlag.STRONGLY_TYPED",
    "trt.BuilderFlag", "BuilderFlag.TF32", "trt.MemoryPoolType", "MemoryPoolType.WORKSPACE",
    "trt.ExecutionContextAllocationStrategy", "ExecutionContextAllocationStrategy.USER_MANAGED", "trt.DataType",
    "DataType.FLOAT", "DataType.INT64",
    # building (lddm_export/engines.py)
    "Builder.create_network", "Builder.create_builder_config", "Builder.create_optimization_profile",
    "Builder.build_serialized_network", "OnnxParser.parse_from_file", "OnnxParser.num_errors",
    "OnnxParser.get_error", "IBuilderConfig.clear_flag", "IBuilderConfig.set_memory_pool_limit",
    "IBuilderConfig.add_optimization_profile", "IBuilderConfig.create_timing_cache",
    "IBuilderConfig.set_timing_cache", "IOptimizationProfile.set_shape", "ITimingCache.serialize",
    # running (runtimes/backends/trt_runner.py)
    "Runtime.deserialize_cuda_engine", "ICudaEngine.num_io_tensors", "ICudaEngine.get_tensor_name",
    "ICudaEngine.get_tensor_dtype", "ICudaEngine.device_memory_size_v2", "ICudaEngine.create_execution_context",
    "IExecutionContext.set_device_memory", "IExecutionContext.set_input_shape",
    "IExecutionContext.get_tensor_shape", "IExecutionContext.set_tensor_address",
    "IExecutionContext.execute_async_v3",
}


# --- the uses in the code

@dataclass(frozen=True)
class Use:
    """One access to a TensorRT name: owner "trt" (the module) or a class name, and the member.

    For a call, args is the number of positional arguments (None when one is starred) and
    keywords the keyword names; called is False for a plain attribute read.
    """

    owner: str
    member: str
    where: str
    called: bool = False
    args: int | None = 0
    keywords: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.owner}.{self.member}"


def _root_and_chain(node: ast.AST) -> tuple[str | None, list[str]]:
    """For a.b.c return ("a", ["b", "c"])."""
    chain = []
    while isinstance(node, ast.Attribute):
        chain.append(node.attr)
        node = node.value
    return (node.id if isinstance(node, ast.Name) else None), chain[::-1]


def _owned(root: str | None, chain: list[str]) -> list[tuple[str, str]]:
    """The (owner, member) pairs of one attribute chain, e.g. trt.BuilderFlag.TF32 ->
    [("trt", "BuilderFlag"), ("BuilderFlag", "TF32")], self._engine.x -> [("ICudaEngine", "x")]."""
    if root == "trt":
        return list(zip(["trt"] + chain[:-1], chain))
    names = [root or ""] + chain
    for i, name in enumerate(names[:-1]):
        if name.lstrip("_") in TRT_OBJECTS:
            return [(TRT_OBJECTS[name.lstrip("_")], names[i + 1])]
    return []


def uses_in(tree: ast.AST, filename: str) -> list[Use]:
    """The TensorRT uses of one parsed file (see the module docstring)."""
    calls = {id(node.func): node for node in ast.walk(tree)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    uses = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or id(node) in inner:
            continue
        pairs = _owned(*_root_and_chain(node))
        where = f"{filename}:{node.lineno}"
        uses += [Use(owner, member, where) for owner, member in pairs[:-1]]
        if pairs:
            call = calls.get(id(node))
            owner, member = pairs[-1]
            if call is None:
                uses.append(Use(owner, member, where))
            else:
                starred = any(isinstance(a, ast.Starred) for a in call.args)
                uses.append(Use(owner, member, where, True, None if starred else len(call.args),
                                tuple(k.arg for k in call.keywords if k.arg)))
    return uses


def used_tensorrt() -> list[Use]:
    uses = [Use("DataType", member, "TRT_DTYPES") for member in TRT_DTYPES.values()]   # getattr(trt.DataType, m)
    for rel in SOURCES:
        uses += uses_in(ast.parse((ROOT / rel).read_text(), rel), rel)
    return uses


# --- the check of the uses against one TensorRT's API table

def accepts(signature: list[list], args: int | None, keywords: tuple[str, ...]) -> bool:
    """Whether a signature [[name, has_default], ...] (self dropped) takes this call."""
    names = [name for name, _ in signature]
    if any(name.startswith("*") for name in names):
        return True
    if args is None:                    # a starred argument may fill any positional parameters
        return all(k in names for k in keywords)
    if args > len(names) or any(k not in names[args:] for k in keywords):
        return False
    given = set(names[:args]) | set(keywords)
    return all(has_default or name in given for name, has_default in signature)


def problems(uses: list[Use], api: dict) -> list[str]:
    """What in `uses` this TensorRT lacks: a name, on its owner, of its kind, taking the call's arguments.

    api: {"module": {name: info}, "classes": {class: {member: info}}} with info {"kind":
    "class" | "method" | "property" | "value", "signatures": [[[param, has_default], ...], ...]}.
    """
    found = []
    for use in uses:
        members = api["module"] if use.owner == "trt" else api["classes"].get(use.owner)
        info = None if members is None else members.get(use.member)
        if info is None:
            found.append(f"{use.where}: {use.key} does not exist")
        elif use.called and info["kind"] not in ("method", "class"):
            found.append(f"{use.where}: {use.key} is a {info['kind']}, but the code calls it")
        elif not use.called and info["kind"] == "method":
            found.append(f"{use.where}: {use.key} is a method, but the code reads it as an attribute")
        elif use.called and not any(accepts(s, use.args, use.keywords) for s in info["signatures"]):
            found.append(f"{use.where}: {use.key} takes {info['signatures']}, not {use.args} positional "
                         f"argument(s) and keywords {list(use.keywords)}")
    return found


def test_the_collected_uses_are_the_reviewed_list():
    found = {use.key for use in used_tensorrt()}
    assert found == REVIEWED, (f"new TensorRT names to review and add: {sorted(found - REVIEWED)}; "
                               f"no longer used: {sorted(REVIEWED - found)}")


def test_the_collector_sees_every_kind_of_access():
    code = ("x = trt.A.B\nself._engine.c()\nstate.context.d(1, *rest, k=2)\nconfig.e = 1\n"
            "torch.cuda.synchronize()\nnot_trt.f\nself.max_batch\nengine.g(h=engine.i)\n")
    got = {(u.key, u.called, u.args, u.keywords) for u in uses_in(ast.parse(code), "x.py")}
    assert got == {("trt.A", False, 0, ()), ("A.B", False, 0, ()), ("ICudaEngine.c", True, 0, ()),
                   ("IExecutionContext.d", True, None, ("k",)), ("IBuilderConfig.e", False, 0, ()),
                   ("ICudaEngine.g", True, 0, ("h",)), ("ICudaEngine.i", False, 0, ())}


def test_the_check_refuses_a_wrong_owner_kind_or_keyword():
    method = {"kind": "method", "signatures": [[["name", False], ["memory", False]]]}
    api = {"module": {}, "classes": {
        "Runtime": {"deserialize_cuda_engine": {"kind": "method", "signatures": [[["serialized_engine", False]]]}},
        "ITimingCache": {"serialize": {"kind": "method", "signatures": [[]]}},
        "ICudaEngine": {"num_io_tensors": {"kind": "property", "signatures": []}},
        "IExecutionContext": {"set_tensor_address": method}}}
    code = ("runtime.serialize()\nengine.num_io_tensors()\ncontext.set_tensor_address\n"
            "context.set_tensor_address(name='x', ptr=1)\ncontext.set_tensor_address('x')\n"
            "context.set_tensor_address('x', memory=1)\ntiming_cache.serialize()\n")
    found = problems(uses_in(ast.parse(code), "x.py"), api)
    found.sort(key=lambda line: int(line.split(":")[1]))
    assert [line.split(":")[1] for line in found] == ["1", "2", "3", "4", "5"], found
    assert "Runtime.serialize does not exist" in found[0] and "is a property" in found[1]
    assert "is a method" in found[2] and "keywords ['name', 'ptr']" in found[3] and "not 1 positional" in found[4]


# --- the wheels

STUB_SYMBOLS = ["createInferBuilder_INTERNAL", "createInferRefitter_INTERNAL", "createInferRuntime_INTERNAL",
                "createNvOnnxParser_INTERNAL", "createNvOnnxParserRefitter_INTERNAL", "getBuilderPluginRegistry",
                "getNvOnnxParserVersion", "getPluginRegistry", "initLibNvInferPlugins"]

# Run inside the extracted wheel: import tensorrt.so and print its API table as JSON.
INTROSPECT = r'''
import inspect, json, re, tensorrt as trt

def split_top(text):
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch in "([{<") - (ch in ")]}>")
        if depth < 0:
            return parts + [text[start:i]]
        if ch == "," and depth == 0:
            parts.append(text[start:i]); start = i + 1
    return parts + [text[start:]]

def signatures(name, doc):
    out = []
    for line in (doc or "").splitlines():
        m = re.match(r"\s*(?:\d+\. )?" + re.escape(name) + r"\((.*)", line)
        if m:
            params = [[p.split(":")[0].split("=")[0].strip(), " = " in p] for p in split_top(m.group(1)) if p.strip()]
            out.append([p for p in params if p[0] != "self"])
    # An overloaded function's first line is the catch-all name(*args, **kwargs); the overloads follow.
    real = [s for s in out if not any(p[0].startswith("*") for p in s)]
    return real or out

def info(owner, name):
    static = inspect.getattr_static(owner, name)
    if isinstance(static, property):
        return {"kind": "property", "signatures": []}
    value = getattr(owner, name)
    if isinstance(value, type):
        return {"kind": "class", "signatures": signatures("__init__", value.__init__.__doc__)}
    if callable(value):
        return {"kind": "method", "signatures": signatures(name, value.__doc__)}
    return {"kind": "value", "signatures": []}

public = lambda obj: [n for n in dir(obj) if not n.startswith("_")]
classes = {n: getattr(trt, n) for n in public(trt) if isinstance(getattr(trt, n), type)}
print(json.dumps({"module": {n: info(trt, n) for n in public(trt)},
                  "classes": {n: {m: info(c, m) for m in public(c)} for n, c in classes.items()}}))
'''


def _pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return True
    except OSError:
        return False


def _wheel(cache: Path, version: str) -> Path:
    """The tensorrt-cu12-bindings wheel of `version` for this Python, downloaded into `cache` once."""
    py = f"{sys.version_info.major}{sys.version_info.minor}"
    pattern = f"tensorrt_cu12_bindings-{version}-cp{py}-*.whl"
    if not sorted(cache.glob(pattern)):
        if not _pypi_reachable():
            pytest.skip(f"PyPI is unreachable, so the tensorrt-cu12-bindings {version} wheel "
                        f"cannot be downloaded to check the TensorRT names")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--python-version", f"{sys.version_info.major}.{sys.version_info.minor}", "--implementation", "cp",
               "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux_2_28_x86_64",
               "--timeout", "30", "--retries", "2", "-d", str(cache), f"tensorrt-cu12-bindings=={version}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, f"pip download failed although PyPI is reachable:\n{done.stderr}"
    return sorted(cache.glob(pattern))[0]


def _introspect(wheel: Path, version: str, workdir: Path, compiler: str) -> dict:
    """The API table of one wheel's tensorrt.so, imported over stub libraries in a subprocess."""
    with zipfile.ZipFile(wheel) as archive:
        (workdir / "tensorrt.so").write_bytes(archive.read("tensorrt_bindings/tensorrt.so"))
        init = archive.read("tensorrt_bindings/__init__.py").decode()
    major = version.split(".")[0]
    symbols = list(STUB_SYMBOLS)
    for _ in range(20):         # a newer wheel may need another entry point: stub it and retry
        (workdir / "stub.c").write_text("".join(f"void *{s}(void) {{ return 0; }}\n" for s in symbols))
        for lib in ("nvinfer", "nvonnxparser", "nvinfer_plugin"):
            subprocess.run([compiler, "-shared", "-fPIC", "-o", str(workdir / f"lib{lib}.so.{major}"),
                            str(workdir / "stub.c")], check=True, capture_output=True)
        done = subprocess.run([sys.executable, "-c", INTROSPECT], cwd=workdir, capture_output=True,
                              text=True, timeout=300)
        missing = re.search(r"undefined symbol: (\w+)", done.stderr)
        if done.returncode == 0 or not missing:
            break
        symbols.append(missing.group(1))
    assert done.returncode == 0, f"tensorrt.so of {wheel.name} did not import over stubs:\n{done.stderr[-2000:]}"
    api = json.loads(done.stdout)
    for node in ast.parse(init).body:       # module-level names of __init__.py: __version__, helpers
        targets = node.targets if isinstance(node, ast.Assign) else []
        for name in [t.id for t in targets if isinstance(t, ast.Name)]:
            api["module"].setdefault(name, {"kind": "value", "signatures": []})
        if isinstance(node, ast.FunctionDef):
            api["module"].setdefault(node.name, {"kind": "method", "signatures": [[["*args", True]]]})
    return api


@pytest.fixture(scope="module")
def apis(request, tmp_path_factory) -> dict[str, dict]:
    """version -> API table (see problems()), wheels cached in pytest's cache dir (in a
    temporary one when the cache plugin is off, `-p no:cacheprovider`)."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        pytest.skip("the tensorrt-cu12-bindings wheels checked here are x86-64 Linux modules")
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler (cc) to build the stub libraries tensorrt.so is imported over")
    if hasattr(request.config, "cache"):
        cache = Path(request.config.cache.mkdir("tensorrt-cu12-bindings"))
    else:
        cache = tmp_path_factory.mktemp("tensorrt-cu12-bindings")
    return {version: _introspect(_wheel(cache, version), version, tmp_path_factory.mktemp(f"trt{version}"), compiler)
            for version in WHEELS}


def _has(api: dict, key: str) -> bool:
    owner, member = key.split(".", 1)
    members = api["module"] if owner == "trt" else api["classes"].get(owner, {})
    return member in members


@pytest.mark.parametrize("version", WHEELS)
def test_every_use_exists_on_its_owner_with_its_arguments(apis, version):
    found = problems(used_tensorrt(), apis[version])
    assert not found, f"TensorRT {version}: " + "; ".join(found)


@pytest.mark.parametrize("version", WHEELS)
def test_names_are_whole_and_per_class(apis, version):
    api = apis[version]
    assert _has(api, "ITimingCache.serialize") and _has(api, "Runtime.deserialize_cuda_engine")
    assert not _has(api, "Runtime.serialize")                 # only inside deserialize_cuda_engine
    assert not _has(api, "ICudaEngine.set_tensor_address")    # it is IExecutionContext's
    assert not _has(api, "IExecutionContext.set_input_shapes_v7")


@pytest.mark.parametrize("version", WHEELS)
def test_keyword_names_come_from_the_bindings(apis, version):
    classes = apis[version]["classes"]
    assert classes["IExecutionContext"]["set_tensor_address"]["signatures"] == [[["name", False], ["memory", False]]]
    assert classes["IBuilderConfig"]["set_timing_cache"]["signatures"] == [[["cache", False],
                                                                           ["ignore_mismatch", False]]]
    assert classes["ICudaEngine"]["num_io_tensors"]["kind"] == "property"
    bad = Use("IBuilderConfig", "set_timing_cache", "x.py:1", True, 1, ("ignore_mismatches",))
    assert problems([bad], apis[version])


def test_the_check_sees_what_tensorrt_11_removed(apis):
    """The API differences this project avoids: present in 10.3, gone in 11.x."""
    removed_in_11 = ["NetworkDefinitionCreationFlag.EXPLICIT_BATCH", "BuilderFlag.FP16",
                     "Builder.platform_has_fast_fp16", "ICudaEngine.device_memory_size"]
    for key in removed_in_11:
        assert _has(apis["10.3.0"], key), key
        assert not _has(apis["11.0.0.114"], key), key
        assert not _has(apis["11.4.0.106"], key), key
