"""Writing (and, for the engine path, reading) a bundle's manifest.json.

The schema is documented once, in runtimes/bundle.py, which also reads and validates it; this
module fills it in. Neither imports torch or training/: `lddm-export build --bundle DIR
--engines on` and `inspect` run on a Jetson with only tensorrt, onnx and numpy.
"""
from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

from runtimes.bundle import FORMAT, HEAD_FORM, MANIFEST, VERSION, Bundle, validate_manifest
from runtimes.errors import BundleError
from runtimes.fileio import sha256_file, write_json

PARITY = "parity.json"
UNHASHED = (MANIFEST, PARITY)   # the files table covers every other file of the bundle
# Distributions whose versions go into "tools"; those marked True change what export writes.
TOOLS = {"torch": True, "onnx": True, "onnxscript": True, "onnxslim": True, "lddm-export": True,
         "onnxruntime": False, "onnxruntime-gpu": False, "tensorrt": False}


def tool_versions() -> dict[str, str]:
    """Installed versions of the export and runtime tools (absent ones left out).

    Returns:
        e.g. {"torch": "2.13.0+cpu", "onnx": "1.23.2", ..., "lddm_export": "0.1.0"}; names use
        underscores as the manifest does.
    """
    versions = {}
    for dist in TOOLS:
        try:
            versions[dist.replace("-", "_")] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def export_tools(tools: dict) -> dict:
    """The part of a tools table that decides what the ONNX export writes (the cache key)."""
    return {k: v for k, v in tools.items() if TOOLS.get(k.replace("_", "-"), False)}


def new_manifest(config: dict, tokenizer: dict | None, data: str | None, checkpoint_path: Path, checkpoint_sha256: str,
                 graphs: dict, batch_profile: dict, opset: int) -> dict:
    """The manifest of a freshly exported bundle (no engines yet, files table empty).

    Args:
        config: the checkpoint's config dict (training.config.ModelConfig.to_dict()).
        tokenizer: the checkpoint's tokenizer entry, or None.
        data: what the model was trained on (the checkpoint's train["data"]: "sawtooth",
            "text:PATH", "lm1b"), or None when the checkpoint does not say.
        checkpoint_path: the checkpoint file (recorded as an absolute path).
        checkpoint_sha256: its sha256.
        graphs: graph name -> {"inputs", "outputs", "onnx": {precision: relative path}}.
        batch_profile: {"min", "opt", "max"}.
        opset: the ONNX opset of every graph.
    Returns:
        the manifest dict, in the schema of runtimes/bundle.py.
    """
    return {
        "format": FORMAT, "version": VERSION,
        "variant": config["variant"],
        "config": config,
        "shapes": {"L": config["seq_len"], "P": config["n_latent"], "D": config["latent_dim"],
                   "V": config["vocab_size"] + 1, "W": config["width"], "mask_id": config["vocab_size"]},
        "schedule": {"mask": {"kind": config["mask_schedule"], "eps": config["mask_eps"]},
                     "latent": {"kind": config["latent_schedule"], "eps": config["latent_eps"]}},
        "graphs": graphs,
        "head": HEAD_FORM,
        "batch_profile": dict(batch_profile),
        "opset": opset,
        "engines": [],
        "tokenizer": tokenizer,
        "data": data,
        "checkpoint": {"path": str(Path(checkpoint_path).resolve()), "sha256": checkpoint_sha256},
        "files": {},
        "tools": tool_versions(),
    }


def file_table(bundle_dir: Path) -> dict[str, str]:
    """sha256 of every file under bundle_dir except manifest.json and parity.json.

    Symlinks are neither followed nor hashed: a bundle being written holds regular files only.

    Returns:
        POSIX relative path -> hex sha256, sorted by path.
    Raises:
        BundleError: bundle_dir holds a symlink, or something that is not a file or directory.
    """
    table = {}
    for dirpath, dirnames, filenames in os.walk(bundle_dir):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = path.relative_to(bundle_dir).as_posix()
            if path.is_symlink() or (name in filenames and not path.is_file()):
                raise BundleError(f"bundle {bundle_dir} holds {rel!r}, which is not a regular file or directory; "
                                  f"a bundle holds regular files only, so remove it")
            if name in filenames and rel not in UNHASHED:
                table[rel] = sha256_file(path)
    return dict(sorted(table.items()))


def write_manifest(bundle_dir: Path, manifest: dict) -> dict:
    """Fill in the files table from what is in bundle_dir and write manifest.json.

    Returns:
        the manifest as written.
    Raises:
        BundleError: the manifest would not pass runtimes.bundle.validate_manifest (nothing is
            written: the writer never leaves a manifest its reader refuses).
    """
    manifest = validate_manifest({**manifest, "files": file_table(bundle_dir)}, bundle_dir / MANIFEST)
    write_json(bundle_dir / MANIFEST, manifest, "the manifest")
    return manifest


def read_manifest(bundle_dir: Path) -> dict:
    """Parse and validate a bundle's manifest.json (runtimes.bundle; no hashing).

    Raises:
        BundleError: no such directory or manifest, invalid JSON, another format or version,
            missing, malformed or inconsistent keys, a path or symlink leading out of the
            bundle; the message names the file and says to rebuild.
    """
    return Bundle.open(bundle_dir, check_hashes=False).manifest


def changed_files(bundle_dir: Path, manifest: dict) -> list[str]:
    """Files the manifest lists that are missing or no longer match their sha256."""
    return [rel for rel, digest in manifest["files"].items()
            if not (bundle_dir / rel).is_file() or sha256_file(bundle_dir / rel) != digest]
