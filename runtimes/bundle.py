"""Reading a bundle: manifest.json, its validation, and the hash check of every file.

The manifest (written by lddm_export.manifest, read here and only here):

    {
      "format": "lddm-bundle", "version": 2,
      "variant": "fuji" | "seq" | "mdlm",
      "config": {...},                        # training.config.ModelConfig as a dict
      "shapes": {"L": 128, "P": 4, "D": 8, "V": 3, "W": 64, "mask_id": 2},   # W: the token network's width
      "schedule": {"mask": {"kind": "loglinear", "eps": 0.001},
                   "latent": {"kind": "sqrt", "eps": 0.0001}},
      "graphs": {"<graph>": {"inputs": [...], "outputs": [...],   # runtimes.spec.GraphSpec
                              "onnx": {"fp32": "onnx/<graph>.fp32.onnx",
                                       "fp16": "onnx/<graph>.fp16.onnx"},
                              "fp16_islands": [{"node", "op_type", "reason"}],   # calibrated
                              "int8_fp32_nodes": [{"node", "op_type", "reason"}]}},  # linear layers left FP32
      "head": "trunk+head",                   # the sparse head's form: the graphs "trunk" and "head"
      "fp16_calibration": true,               # whether those islands were calibrated
      "batch_profile": {"min": 1, "opt": 8, "max": 64},
      "opset": 18,
      "engines": [{"graph": ..., "precision": "fp16", "file": "engines/....plan",
                   "onnx_file": "onnx/....onnx", "onnx_sha256": ..., "trt_version": "10.3.0",
                   "gpu_name": ..., "compute_capability": "8.7",
                   "profile": {"min": 1, "opt": 8, "max": 64}}],
      "tokenizer": {"kind": "bpe", "json": ..., "vocab_size": N} | null,   # as in the checkpoint
      "data": "sawtooth" | "text:PATH" | "lm1b" | null,   # what the model was trained on
      "checkpoint": {"path": "/abs/path/model.pt", "sha256": ...},
      "files": {"<relative path>": "<sha256>", ...},   # every file of the bundle but manifest/parity
      "tools": {"torch": ..., "onnx": ..., "onnxruntime": ..., "lddm_export": ...}
    }

A bundle is input from someone else (built on a workstation, engines added on a Jetson, served
elsewhere), so Bundle.open checks all of it before any command uses any of it:
  1. validate_manifest: every key's type and range, and that they agree (shapes with the config,
     the graphs' inputs and outputs with the shapes, the schedule with the config);
  2. paths: every path the manifest names is a plain relative path listed in the files table,
     and no symlink in the bundle leads out of it (only regular files, directories and inward
     symlinks are allowed, so nothing that copies the bundle copies anything from outside);
  3. hashes: every listed file has its recorded sha256 (check_hashes);
  4. ONNX files: their external-data locations are listed files beside them, and their declared
     inputs and outputs are the graph spec's.
Unknown keys are ignored (nothing reads them). The checkpoint path is the one path allowed
outside the bundle: only the torch backend opens it, after matching its sha256.
"""
from __future__ import annotations

import json
import math
import os
import posixpath
import re
import reprlib
from dataclasses import dataclass
from pathlib import Path

from runtimes.errors import BundleError
from runtimes.fileio import sha256_file
from runtimes.options import MAX_BATCH   # the bound of every batch profile, as `build --batch` has it
from runtimes.spec import GRAPHS_BY_VARIANT, GraphSpec, dynamic_profile, graph_specs
from runtimes.tokenizer import tokenizer_problem

FORMAT = "lddm-bundle"
VERSION = 2   # 2: the trunk and head graphs (the sparse head) and shapes.W
MANIFEST = "manifest.json"
HEAD_FORM = "trunk+head"   # how the sparse head is exported (docs/design.md, "The graphs")
VARIANTS = tuple(GRAPHS_BY_VARIANT)
PRECISIONS = ("fp32", "fp16", "int8")
REQUIRED = ("format", "version", "variant", "config", "shapes", "schedule", "graphs", "head", "batch_profile",
            "opset", "engines", "tokenizer", "data", "checkpoint", "files", "tools")
MASK_KINDS = ("linear", "loglinear")   # the schedules runtimes/schedules.py implements
LATENT_KINDS = ("sqrt", "cosine")
# The largest L, P, D or V: 2**24 is far beyond any model exported here (the "base" preset has
# L = 128; a 256k-token vocabulary is 2**18), and an absurd size must not reach an allocation.
MAX_DIM = 1 << 24
MAX_MANIFEST_BYTES = 64 << 20          # a manifest is a few kB; a text tokenizer adds a few MB
ONNX_DTYPES = {1: "float32", 7: "int64"}   # onnx.TensorProto elem_type -> spec dtype
_PART = re.compile(r"[\w.+-]+")         # one component of a bundle path
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DECIMAL = re.compile(r"[0-9]{1,18}")   # an external-data offset or length
REBUILD = "rebuild the bundle with `lddm-export build --ckpt model.pt --force`"


@dataclass
class Bundle:
    """A validated bundle directory. Construct with Bundle.open(path)."""

    root: Path
    manifest: dict

    @classmethod
    def open(cls, root: str | Path, check_hashes: bool = True) -> "Bundle":
        """Open and check a bundle (the four steps of the module docstring).

        Args:
            root: the bundle directory.
            check_hashes: hash every listed file. With False (inspect, and build --bundle, which
                report changed files themselves) missing or unparsable files are left to the
                caller, but nothing that exists may lead out of the bundle.
        Raises:
            BundleError: one sentence naming the file or key and the fix.
        """
        root = Path(root)
        if not root.is_dir():
            raise BundleError(f"bundle {root} is not a directory; build one with `lddm-export build --ckpt model.pt`")
        real = os.path.realpath(root)
        bundle = cls(root, validate_manifest(_read_manifest(root, real), root / MANIFEST))
        _check_tree(root, real)   # with plain relative paths, every listed file is then inside
        if check_hashes:
            bundle.check_hashes()
        for graph, onnx_file in bundle.onnx_files():
            _check_onnx(bundle, graph, onnx_file, strict=check_hashes)
        return bundle

    # --- what the samplers read
    @property
    def variant(self) -> str:
        return self.manifest["variant"]

    @property
    def shapes(self) -> dict:
        return self.manifest["shapes"]

    @property
    def schedule(self) -> dict:
        return self.manifest["schedule"]

    @property
    def graph_names(self) -> list[str]:
        return list(self.manifest["graphs"])

    def spec(self, graph: str) -> GraphSpec:
        return GraphSpec.from_dict(graph, self.manifest["graphs"][graph])

    def profile(self, graph: str, batch_profile: dict | None = None) -> dict:
        """{"min", "opt", "max"} of the graph's dynamic axis for the batch profile (default: the
        manifest's): the batch itself, or the head's rows (runtimes.spec.dynamic_profile)."""
        return dynamic_profile(self.spec(graph), batch_profile or self.manifest["batch_profile"], self.shapes["L"])

    def onnx_path(self, graph: str, precision: str) -> Path:
        files = self.manifest["graphs"][graph]["onnx"]
        if precision not in files:
            raise BundleError(f"bundle {self.root} has no {precision} graph for {graph!r} (it has "
                              f"{sorted(files)}); rebuild with --precision {precision}")
        return self.root / files[precision]

    def onnx_files(self) -> list[tuple[str, str]]:
        """(graph, bundle-relative path) of every ONNX file the manifest names."""
        return [(graph, rel) for graph, g in self.manifest["graphs"].items() for rel in g["onnx"].values()]

    def check_hashes(self) -> None:
        """Every file listed in the manifest is a regular file with the recorded sha256."""
        for rel, digest in self.manifest["files"].items():
            path = self.root / rel
            if not path.is_file():
                raise BundleError(f"bundle file {path} listed in the manifest is missing; {REBUILD}")
            if sha256_file(path) != digest:
                raise BundleError(f"bundle file {path} does not match its sha256 in the manifest "
                                  f"(changed after the build); rebuild the bundle with --force")


# ----------------------------------------------------------------------------- the manifest's values

def validate_manifest(m, path: Path) -> dict:
    """Every key of a parsed manifest: its type, its range, and its agreement with the others.

    Args:
        m: the parsed manifest.json. path: its file (for messages).
    Returns:
        m, unchanged.
    Raises:
        BundleError: "manifest PATH ..." naming the first problem, what it holds and the fix.
    """
    where = f"manifest {path}"
    _require(isinstance(m, dict), where, f"is a JSON {type(m).__name__}, not an object")
    _require(m.get("format") == FORMAT, where, f"has format {_show(m.get('format'))}, expected {FORMAT!r}")
    if m.get("version") != VERSION or isinstance(m.get("version"), bool):
        raise BundleError(f"{where} has version {_show(m.get('version'))}, but this runtime reads "
                          f"version {VERSION}; rebuild the bundle with this lddm-export")
    missing = [k for k in REQUIRED if k not in m]
    _require(not missing, where, f"lacks the keys {missing}")
    _require(m["variant"] in VARIANTS, where, f"has unknown variant {_show(m['variant'])}; expected one of {', '.join(VARIANTS)}")
    _check_shapes(m["shapes"], where)
    _check_schedule(m["schedule"], where)
    _check_config(m["config"], m, where)
    _check_files_table(m["files"], where)
    _check_graphs(m["graphs"], m, where)
    _require(m["head"] == HEAD_FORM, where, f"has head {_show(m['head'])}; this runtime reads {HEAD_FORM!r}")
    _require(_is_profile(m["batch_profile"]), where,
             f"has batch_profile {_show(m['batch_profile'])}; expected integers 1 <= min <= opt <= max <= {MAX_BATCH}")
    _require(_is_int(m["opset"]) and m["opset"] >= 1, where, f"has opset {_show(m['opset'])}; expected a positive integer")
    _require(isinstance(m.get("fp16_calibration", False), bool), where,
             f"has fp16_calibration {_show(m.get('fp16_calibration'))}; expected true or false")
    _check_engines(m["engines"], m, where)
    problem = tokenizer_problem(m["tokenizer"], m["shapes"]["V"] - 1)
    _require(problem is None, where, f"has a tokenizer entry that {problem}")
    _require(m["data"] is None or isinstance(m["data"], str), where,
             f"has a malformed data entry ({_show(m['data'])}); expected a string or null")
    ckpt = m["checkpoint"]
    _require(isinstance(ckpt, dict) and isinstance(ckpt.get("path"), str) and _is_sha256(ckpt.get("sha256")),
             where, f"has a malformed checkpoint record {_show(ckpt)}; expected {{\"path\": str, \"sha256\": hex}}")
    tools = m["tools"]
    _require(isinstance(tools, dict) and all(isinstance(v, str) for v in tools.values()), where,
             f"has a malformed tools table {_show(tools)}; expected tool name -> version string")
    return m


def _check_shapes(shapes, where: str) -> None:
    _require(isinstance(shapes, dict), where, f"has shapes {_show(shapes)}; expected an object with L, P, D, V, W, mask_id")
    for key in "LPDVW":
        _require(_is_int(shapes.get(key)) and 1 <= shapes[key] <= MAX_DIM, where,
                 f"has shapes.{key} {_show(shapes.get(key))}; expected an integer in 1..{MAX_DIM}")
    _require(shapes["V"] >= 3 and _is_int(shapes.get("mask_id")) and shapes["mask_id"] == shapes["V"] - 1, where,
             f"has shapes.V {shapes['V']} and mask_id {_show(shapes.get('mask_id'))}; expected V >= 3 and mask_id = V - 1")


def _check_schedule(schedule, where: str) -> None:
    for part, kinds, high in (("mask", MASK_KINDS, 1.0), ("latent", LATENT_KINDS, 0.5)):
        entry = schedule.get(part) if isinstance(schedule, dict) else None
        ok = (isinstance(entry, dict) and entry.get("kind") in kinds and _is_number(entry.get("eps"))
              and 0.0 < entry["eps"] < high)
        _require(ok, where, f"has schedule.{part} {_show(entry)}; expected kind one of {list(kinds)} "
                            f"and a finite eps in (0, {high})")


# config key -> (manifest section, key) it must equal
CONFIG_MIRRORS = {"seq_len": ("shapes", "L"), "n_latent": ("shapes", "P"), "latent_dim": ("shapes", "D"),
                  "width": ("shapes", "W"),
                  "mask_schedule": ("mask", "kind"), "mask_eps": ("mask", "eps"),
                  "latent_schedule": ("latent", "kind"), "latent_eps": ("latent", "eps")}


def _check_config(config, m: dict, where: str) -> None:
    """The config's variant, sizes and schedule are the manifest's; its other fields are plain values."""
    _require(isinstance(config, dict), where, f"has config {_show(config)}; expected an object")
    for key, value in config.items():
        _require(value is None or isinstance(value, (str, int, float)), where,
                 f"has config.{key} {_show(value)}; expected a string, number, true, false or null")
    wanted = {"variant": m["variant"], "vocab_size": m["shapes"]["V"] - 1}
    for key, (section, inner) in CONFIG_MIRRORS.items():
        wanted[key] = (m["shapes"] if section == "shapes" else m["schedule"][section])[inner]
    for key, value in wanted.items():
        _require(_same(config.get(key), value), where,
                 f"has config.{key} {_show(config.get(key))}, which disagrees with the manifest's {_show(value)}")
    prompt_latent = config.get("prompt_latent", False)   # absent in bundles of models before the option
    _require(isinstance(prompt_latent, bool) and (m["variant"] == "seq" or not prompt_latent), where,
             f"has config.prompt_latent {_show(prompt_latent)}; expected true (seq only) or false")


def _check_files_table(files, where: str) -> None:
    _require(isinstance(files, dict), where, f"has a malformed files table {_show(files)}; expected path -> sha256")
    for rel, digest in files.items():
        _require(_is_bundle_path(rel), where, f"lists the file {_show(rel)}, which is not a plain relative path "
                                              f"inside the bundle (no '..', no leading '/')")
        _require(_is_sha256(digest), where, f"lists {rel!r} with the sha256 {_show(digest)}; expected 64 hex digits")


def _check_graphs(graphs, m: dict, where: str) -> None:
    """The graphs are exactly the variant's, with the spec of the manifest's shapes, and their
    ONNX files are listed in the files table."""
    s = m["shapes"]
    specs = graph_specs(m["variant"], s["L"], s["P"], s["D"], s["V"], s["W"],
                        m["config"].get("prompt_latent", False))
    _require(isinstance(graphs, dict) and sorted(graphs) == sorted(specs), where,
             f"lists the graphs {_show(sorted(graphs) if isinstance(graphs, dict) else graphs)}, but a "
             f"{m['variant']} bundle has {sorted(specs)}")
    for name, g in graphs.items():
        wanted = specs[name].to_dict()
        ok = isinstance(g, dict) and all(_same(g.get(k), wanted[k]) for k in ("inputs", "outputs"))
        _require(ok, where, f"declares inputs/outputs for graph {name!r} that are not {wanted} (the spec of its "
                            f"variant and shapes)")
        onnx = g.get("onnx")   # may be empty: a bundle for the torch backend only (benchmarks/gpu_check.py)
        _require(isinstance(onnx, dict) and set(onnx) <= set(PRECISIONS), where,
                 f"has ONNX files {_show(onnx)} for graph {name!r}; expected precision -> path, "
                 f"precisions among {list(PRECISIONS)}")
        for rel in onnx.values():
            _require_listed(rel, m["files"], where, f"the ONNX file of graph {name!r}")
        for key in ("fp16_islands", "int8_fp32_nodes"):
            nodes = g.get(key, [])
            _require(isinstance(nodes, list) and all(
                isinstance(d, dict) and all(isinstance(d.get(k), str) for k in ("node", "op_type", "reason"))
                for d in nodes), where, f"has malformed {key} for graph {name!r}; expected "
                                        f"[{{\"node\", \"op_type\", \"reason\"}}] of strings")


def _check_engines(engines, m: dict, where: str) -> None:
    _require(isinstance(engines, list), where, f"has engines {_show(engines)}; expected a list")
    for e in engines:
        _require(isinstance(e, dict) and all(isinstance(e.get(k), str) for k in
                                             ("graph", "precision", "file", "onnx_file", "trt_version", "gpu_name")),
                 where, f"has a malformed engine entry {_show(e)}; expected the strings graph, precision, file, "
                        f"onnx_file, trt_version and gpu_name")
        onnx = m["graphs"].get(e["graph"], {}).get("onnx", {})
        _require(e["onnx_file"] == onnx.get(e["precision"]), where,
                 f"has an engine for graph {e['graph']!r} at {e['precision']!r} built from {e['onnx_file']!r}, "
                 f"which is not that graph's ONNX file")
        _require_listed(e["file"], m["files"], where, "an engine file")
        _require(_is_sha256(e.get("onnx_sha256")) and isinstance(e.get("compute_capability"), str)
                 and re.fullmatch(r"\d+\.\d+", e["compute_capability"]) is not None and _is_profile(e.get("profile")),
                 where, f"has an engine entry {e['file']!r} with a malformed onnx_sha256, compute_capability or "
                        f"profile (expected 1 <= min <= opt <= max <= {MAX_BATCH})")


def _require_listed(rel, files: dict, where: str, what: str) -> None:
    """A path the manifest names: plain, relative, and in the files table (so its hash is checked)."""
    _require(_is_bundle_path(rel), where, f"names {what} {_show(rel)}, which is not a plain relative path "
                                          f"inside the bundle (no '..', no leading '/')")
    _require(rel in files, where, f"names {what} {rel!r}, which its files table does not list (so its hash "
                                  f"could not be checked)")


def _require(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise BundleError(f"{where} {what}; {REBUILD}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    """A finite JSON number (not a bool, NaN or Infinity)."""
    return _is_int(v) or (isinstance(v, float) and math.isfinite(v))


def _is_profile(p) -> bool:
    return (isinstance(p, dict) and all(_is_int(p.get(k)) for k in ("min", "opt", "max"))
            and 1 <= p["min"] <= p["opt"] <= p["max"] <= MAX_BATCH)


def _is_sha256(v) -> bool:
    return isinstance(v, str) and _SHA256.fullmatch(v) is not None


def _is_bundle_path(rel) -> bool:
    """A relative POSIX path of plain components: letters, digits, '_', '.', '+', '-'; no '.' or '..'."""
    return (isinstance(rel, str) and 0 < len(rel) <= 1024
            and all(_PART.fullmatch(part) and part not in (".", "..") for part in rel.split("/")))


def _same(a, b) -> bool:
    """Equal as JSON: 16 is not 16.0 and 1 is not true."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _show(value) -> str:
    """A short repr of any JSON value for a message (long strings and deep nesting elided)."""
    return reprlib.repr(value)


# ----------------------------------------------------------------------------- the files

def _read_manifest(root: Path, real: str):
    """The parsed manifest.json of a bundle (a regular file inside it, of bounded size)."""
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"bundle {root} has no manifest.json; rebuild it with `lddm-export build`")
    _check_inside(root, real, MANIFEST)
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"manifest {path} is {path.stat().st_size >> 20} MiB, above the "
                          f"{MAX_MANIFEST_BYTES >> 20} MiB a manifest can be; {REBUILD}")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BundleError(f"manifest {path} is not valid JSON ({str(e)[:80]}); {REBUILD}") from None


def _check_tree(root: Path, real: str) -> None:
    """The bundle holds regular files, directories and symlinks to them inside it, nothing else."""
    def unreadable(e: OSError):
        raise BundleError(f"bundle {root} has a directory that cannot be listed ({e.filename}: {e.strerror}); "
                          f"make it readable or {REBUILD}")

    for dirpath, dirnames, filenames in os.walk(real, onerror=unreadable):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, real)
            if os.path.islink(path):
                _check_inside(root, real, rel)
                if not os.path.exists(path):
                    raise BundleError(f"bundle {root} holds {rel!r}, a symlink that leads nowhere; remove it "
                                      f"or {REBUILD}")
            elif name in filenames and not os.path.isfile(path):
                raise BundleError(f"bundle {root} holds {rel!r}, which is not a regular file (a pipe, socket or "
                                  f"device); remove it or {REBUILD}")


def _check_inside(root: Path, real: str, rel: str) -> None:
    """root/rel, every symlink on the way resolved, stays inside the bundle."""
    target = os.path.realpath(os.path.join(real, rel))
    if os.path.commonpath([real, target]) != real:
        raise BundleError(f"bundle {root} holds {rel!r}, a symlink that leads out of the bundle (to {target}); "
                          f"remove it or {REBUILD}")


def _check_onnx(bundle: Bundle, graph: str, rel: str, strict: bool) -> None:
    """One ONNX file: its external data are listed files beside it and its inputs/outputs are the spec's.

    Not strict (no hash check of the whole bundle): a file that is missing or differs from its
    recorded hash is left to the caller, which reports (inspect) or refuses (build --bundle) it.
    """
    import onnx
    from google.protobuf.message import DecodeError

    path = bundle.root / rel
    if not strict and (not path.is_file() or sha256_file(path) != bundle.manifest["files"][rel]):
        return
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (OSError, ValueError, DecodeError) as e:
        raise BundleError(f"bundle file {path} is not an ONNX model ({str(e)[:80]}); {REBUILD}") from None
    try:
        tensors = list(onnx_tensors(model))
    except RecursionError:
        raise BundleError(f"bundle file {path} nests subgraphs too deeply to check; {REBUILD}") from None
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            _check_external(bundle, rel, {e.key: e.value for e in tensor.external_data})
    spec = bundle.spec(graph)
    wanted = {s.name: (s.dtype, list(s.shape)) for s in spec.inputs + spec.outputs}
    initializers = {t.name for t in model.graph.initializer}
    found = {v.name: _onnx_type(v) for v in list(model.graph.input) + list(model.graph.output)
             if v.name not in initializers}
    if found != wanted:
        raise BundleError(f"bundle file {path} declares the inputs and outputs {_show(found)}, but graph {graph!r} "
                          f"of this bundle is {_show(wanted)}; {REBUILD}")


def _check_external(bundle: Bundle, onnx_rel: str, info: dict) -> None:
    """An external-data reference of a tensor in onnx_rel: a listed file beside it, within its size."""
    location = info.get("location", "")
    rel = posixpath.join(posixpath.dirname(onnx_rel), location)
    if not (_is_bundle_path(location) and rel in bundle.manifest["files"]):
        raise BundleError(f"bundle file {bundle.root / onnx_rel} keeps weights in {_show(location)}, which is not "
                          f"a file of the bundle listed in its manifest; {REBUILD}")
    offset, length = info.get("offset", "0"), info.get("length", "0")
    path = bundle.root / rel
    if not (_DECIMAL.fullmatch(offset) and _DECIMAL.fullmatch(length)) or (
            path.is_file() and int(offset) + int(length) > path.stat().st_size):
        raise BundleError(f"bundle file {bundle.root / onnx_rel} reads {location!r} at offset {offset!r}, length "
                          f"{length!r}, outside that file; {REBUILD}")


def onnx_tensors(message):
    """Every TensorProto anywhere in an ONNX message: initializers, attributes, subgraphs, functions."""
    for field, value in message.ListFields():
        if field.message_type is None:
            continue
        for item in (value,) if hasattr(value, "ListFields") else value:
            if item.DESCRIPTOR.name == "TensorProto":
                yield item
            yield from onnx_tensors(item)


def _onnx_type(value) -> tuple:
    """(dtype, shape) of an ONNX graph input/output in the spec's terms: ("int64", ["B", 16])."""
    t = value.type.tensor_type
    dims = [d.dim_param if d.WhichOneof("value") == "dim_param" else
            d.dim_value if d.WhichOneof("value") == "dim_value" else None for d in t.shape.dim]
    return ONNX_DTYPES.get(t.elem_type, f"elem_type {t.elem_type}"), dims
