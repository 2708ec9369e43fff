"""Reading a bundle: manifest.json, its schema, and the hash check of every file.

The manifest (written by lddm_export.manifest, read here and only here):

    {
      "format": "lddm-bundle", "version": 1,
      "variant": "fuji" | "seq" | "mdlm",
      "config": {...},                        # training.config.ModelConfig as a dict
      "shapes": {"L": 128, "P": 4, "D": 8, "V": 3, "mask_id": 2},
      "schedule": {"mask": {"kind": "loglinear", "eps": 0.001},
                   "latent": {"kind": "sqrt", "eps": 0.0001}},
      "graphs": {"<graph>": {"inputs": [...], "outputs": [...],   # runtimes.spec.GraphSpec
                              "onnx": {"fp32": "onnx/<graph>.fp32.onnx",
                                       "fp16": "onnx/<graph>.fp16.onnx"},
                              "fp16_islands": [{"node", "op_type", "reason"}]}},  # calibrated
      "fp16_calibration": true,               # whether those islands were calibrated
      "batch_profile": {"min": 1, "opt": 8, "max": 64},
      "opset": 18,
      "engines": [{"graph": ..., "precision": "fp16", "file": "engines/....plan",
                   "onnx_file": "onnx/....onnx", "onnx_sha256": ..., "trt_version": "10.3.0",
                   "gpu_name": ..., "compute_capability": "8.7",
                   "profile": {"min": 1, "opt": 8, "max": 64}}],
      "tokenizer": {...} | null,              # as in the checkpoint
      "data": "sawtooth" | "text:PATH" | "lm1b" | null,   # what the model was trained on
      "checkpoint": {"path": "/abs/path/model.pt", "sha256": ...},
      "files": {"<relative path>": "<sha256>", ...},   # every file of the bundle but manifest/parity
      "tools": {"torch": ..., "onnx": ..., "onnxruntime": ..., "lddm_export": ...}
    }
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from runtimes.errors import BundleError
from runtimes.spec import GraphSpec

FORMAT = "lddm-bundle"
VERSION = 1
PRECISIONS = ("fp32", "fp16")
REQUIRED = ("format", "version", "variant", "config", "shapes", "schedule", "graphs",
            "batch_profile", "engines", "tokenizer", "data", "checkpoint", "files", "tools")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Bundle:
    """A validated bundle directory. Construct with Bundle.open(path)."""

    root: Path
    manifest: dict

    @classmethod
    def open(cls, root: str | Path, check_hashes: bool = True) -> "Bundle":
        root = Path(root)
        path = root / "manifest.json"
        if not root.is_dir():
            raise BundleError(f"bundle {root} is not a directory; build one with `lddm-export build --ckpt model.pt`")
        if not path.is_file():
            raise BundleError(f"bundle {root} has no manifest.json; rebuild it with `lddm-export build`")
        try:
            manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BundleError(f"manifest {path} is not valid JSON ({e}); rebuild the bundle") from None
        bundle = cls(root, validate_manifest(manifest, path))
        if check_hashes:
            bundle.check_hashes()
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

    def onnx_path(self, graph: str, precision: str) -> Path:
        files = self.manifest["graphs"][graph]["onnx"]
        if precision not in files:
            raise BundleError(f"bundle {self.root} has no {precision} graph for {graph!r} (it has "
                              f"{sorted(files)}); rebuild with --precision {precision}")
        return self.root / files[precision]

    def check_hashes(self) -> None:
        """Every file listed in the manifest exists and has the recorded sha256."""
        for rel, digest in self.manifest["files"].items():
            path = self.root / rel
            if not path.is_file():
                raise BundleError(f"bundle file {path} listed in the manifest is missing; rebuild the bundle")
            if sha256_file(path) != digest:
                raise BundleError(f"bundle file {path} does not match its sha256 in the manifest "
                                  f"(changed after the build); rebuild the bundle with --force")


def validate_manifest(m, path: Path) -> dict:
    """Structural checks of a parsed manifest; raises BundleError naming the first problem."""
    if not isinstance(m, dict):
        raise BundleError(f"manifest {path} is not a JSON object; rebuild the bundle")
    if m.get("format") != FORMAT:
        raise BundleError(f"manifest {path} has format {m.get('format')!r}, expected {FORMAT!r}; rebuild the bundle")
    if m.get("version") != VERSION:
        raise BundleError(f"manifest {path} has version {m.get('version')!r}, but this runtime reads "
                          f"version {VERSION}; rebuild the bundle with this lddm-export")
    missing = [k for k in REQUIRED if k not in m]
    if missing:
        raise BundleError(f"manifest {path} lacks the keys {missing}; rebuild the bundle")
    if m["variant"] not in ("mdlm", "fuji", "seq"):
        raise BundleError(f"manifest {path} has unknown variant {m['variant']!r}; expected mdlm, fuji or seq")
    shapes = m["shapes"]
    for key in ("L", "P", "D", "V", "mask_id"):
        if not isinstance(shapes, dict) or not isinstance(shapes.get(key), int) or shapes[key] < 0:
            raise BundleError(f"manifest {path} has no valid shapes.{key}; rebuild the bundle")
    if m["data"] is not None and not isinstance(m["data"], str):
        raise BundleError(f"manifest {path} has a malformed data entry ({str(m['data'])[:40]!r}); rebuild the bundle")
    if not isinstance(m["graphs"], dict) or not m["graphs"]:
        raise BundleError(f"manifest {path} lists no graphs; rebuild the bundle")
    for name, g in m["graphs"].items():
        try:
            GraphSpec.from_dict(name, g)
            assert isinstance(g["onnx"], dict) and all(p in PRECISIONS for p in g["onnx"])
        except (KeyError, TypeError, AssertionError, ValueError):
            raise BundleError(f"manifest {path} has a malformed entry for graph {name!r}; rebuild the bundle") from None
    if not isinstance(m["files"], dict) or not all(isinstance(v, str) for v in m["files"].values()):
        raise BundleError(f"manifest {path} has a malformed files table; rebuild the bundle")
    for rel in m["files"]:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise BundleError(f"manifest {path} lists a file outside the bundle ({rel!r}); rebuild the bundle")
    return m
