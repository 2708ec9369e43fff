"""Tiny bundles for the runtime tests, in the runtimes/bundle.py format.

`tiny_checkpoint` saves a tiny model of a variant with random (non-trivial) weights: the
zero-initialised adaLN and heads of a fresh model would make every output uniform, and a
parity test on uniform outputs could not fail. `tiny_bundle` exports the sampling graphs of
that checkpoint to FP32 ONNX with torch.onnx.export (the dynamo exporter, B dynamic) and
writes a manifest as lddm_export would, so these tests do not depend on the exporter's build.

Exports take seconds each, so bundles are cached on disk, keyed by the variant, the sizes
and the sha256 of training/model.py and of this file (a changed network rebuilds them).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import onnx
import pytest
import torch

from runtimes.bundle import FORMAT, VERSION, sha256_file
from runtimes.spec import graph_specs
from training.checkpoint import save_checkpoint
from training.config import PRESETS, ModelConfig
from training.model import LDDM, graph_modules

SAMPLING_GRAPHS = {"mdlm": ("denoiser",), "fuji": ("denoiser",), "seq": ("latent_denoiser", "token_denoiser")}
TINY = dict(seq_len=16, vocab_size=5, n_latent=2, latent_dim=4, **PRESETS["tiny"])
BATCH_PROFILE = {"min": 1, "opt": 8, "max": 64}
OPSET = 18
MODEL_SOURCE = Path(__file__).resolve().parents[1] / "training" / "model.py"
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def tiny_config(variant: str, **overrides) -> ModelConfig:
    return ModelConfig(variant=variant, **{**TINY, **overrides})


def tiny_tokenizer_entry() -> dict:
    """A small byte-level BPE trained on the first lines of the offline corpus (or a fallback text)."""
    from training.data import tokenizer_entry, train_bpe_tokenizer

    lines = CORPUS.read_text().splitlines()[:400] if CORPUS.is_file() else ["to be or not to be"] * 50
    return tokenizer_entry(train_bpe_tokenizer([line for line in lines if line.strip()], 300), "bpe")


def tiny_checkpoint(path: Path, variant: str, seed: int = 0, text: bool = False, **overrides) -> Path:
    """Save a tiny `variant` model with every weight perturbed by N(0, 0.1^2) noise.

    With text=True the checkpoint records a BPE tokenizer and the vocabulary is its size.
    """
    tokenizer = tiny_tokenizer_entry() if text else None
    if tokenizer is not None:
        overrides = {**overrides, "vocab_size": tokenizer["vocab_size"]}
    torch.manual_seed(seed)
    model = LDDM(tiny_config(variant, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_checkpoint(path, model, tokenizer=tokenizer, train={"steps": 0, "note": "random test weights"})
    return path


def _export(module: torch.nn.Module, spec, path: Path, batch: int = 2) -> None:
    """torch.onnx.export (dynamo) with B dynamic on every input."""
    dtypes = {"int64": torch.int64, "float32": torch.float32}
    args = tuple(torch.zeros(s.concrete_shape(batch), dtype=dtypes[s.dtype]) for s in spec.inputs)
    b = torch.export.Dim("B", min=1, max=1024)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, input_names=spec.input_names, output_names=spec.output_names,
                                    dynamo=True, dynamic_shapes=tuple({0: b} for _ in spec.inputs),
                                    opset_version=OPSET, verbose=False)
    program.save(str(path))
    onnx.checker.check_model(str(path))


def build_tiny_bundle(out: Path, ckpt: Path) -> Path:
    """Export the sampling graphs of `ckpt` (FP32) and write the manifest into `out`."""
    from training.checkpoint import load_checkpoint

    model, raw = load_checkpoint(ckpt)
    cfg = model.cfg
    shapes = {"L": cfg.seq_len, "P": cfg.n_latent, "D": cfg.latent_dim, "V": cfg.total_vocab,
              "mask_id": cfg.mask_id}
    specs = graph_specs(cfg.variant, shapes["L"], shapes["P"], shapes["D"], shapes["V"])
    modules = graph_modules(model)
    (out / "onnx").mkdir(parents=True, exist_ok=True)
    graphs, files = {}, {}
    for name in SAMPLING_GRAPHS[cfg.variant]:
        rel = f"onnx/{name}.fp32.onnx"
        _export(modules[name], specs[name], out / rel)
        graphs[name] = {**specs[name].to_dict(), "onnx": {"fp32": rel}}
        files[rel] = sha256_file(out / rel)
    latent = ({"kind": cfg.latent_schedule, "eps": cfg.latent_eps} if cfg.has_latent else None)
    manifest = {
        "format": FORMAT, "version": VERSION, "variant": cfg.variant, "config": cfg.to_dict(),
        "shapes": shapes,
        "schedule": {"mask": {"kind": cfg.mask_schedule, "eps": cfg.mask_eps}, "latent": latent},
        "graphs": graphs, "batch_profile": dict(BATCH_PROFILE), "opset": OPSET, "engines": [],
        "tokenizer": raw["tokenizer"],
        "checkpoint": {"path": str(ckpt.resolve()), "sha256": sha256_file(ckpt)},
        "files": files, "tools": {"torch": torch.__version__, "onnx": onnx.__version__},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


def cached_tiny_bundle(cache_dir: Path, variant: str, seed: int = 0, text: bool = False) -> Path:
    """A tiny bundle of `variant` (checkpoint inside it as model.pt), built once per model source.

    Bundles of older sources (other keys) are removed when a new one is built.
    """
    key = hashlib.sha256(f"{variant}-{seed}-{text}-{sorted(TINY.items())}-{OPSET}".encode()
                         + MODEL_SOURCE.read_bytes() + Path(__file__).read_bytes()).hexdigest()[:16]
    prefix = f"{variant}{'-text' if text else ''}-seed{seed}-"
    root = Path(cache_dir) / f"{prefix}{key}"
    if not (root / "manifest.json").is_file():
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{variant}-"))
        tiny_checkpoint(tmp / "model.pt", variant, seed, text)
        build_tiny_bundle(tmp, tmp / "model.pt")
        _repoint_checkpoint(tmp, root / "model.pt")
        try:
            tmp.rename(root)
        except OSError:  # another process finished the same bundle first
            shutil.rmtree(tmp, ignore_errors=True)
        for stale in Path(cache_dir).glob(f"{prefix}*"):
            if stale != root:
                shutil.rmtree(stale, ignore_errors=True)
    return root


@pytest.fixture(scope="session")
def bundle_cache(request, tmp_path_factory) -> Path:
    """Where tiny bundles are kept: pytest's cache when enabled (reused across runs)."""
    cache = getattr(request.config, "cache", None)
    return cache.mkdir("lddm-runtime-bundles") if cache is not None else tmp_path_factory.mktemp("bundles")


def _repoint_checkpoint(root: Path, ckpt: Path) -> None:
    """Record `ckpt` as the bundle's checkpoint path (the file itself is unchanged)."""
    path = root / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["checkpoint"]["path"] = str(ckpt.resolve())
    path.write_text(json.dumps(manifest, indent=2))


def copy_bundle(src: Path, dst: Path) -> Path:
    """A private copy of a cached bundle (for tests that damage or move things)."""
    shutil.copytree(src, dst)
    _repoint_checkpoint(dst, dst / "model.pt")
    return dst


EXPORT_SOURCES = ("export.py", "fp16.py", "build.py", "manifest.py")


def built_example_bundle(cache_dir: Path, ckpt: Path) -> Path:
    """The real `lddm-export build` (fp32 + fp16, no engines) of a checkpoint, cached on disk.

    Keyed by the checkpoint's sha256 and the exporter's sources, so a new checkpoint or a
    changed export pass builds afresh.
    """
    from lddm_export.build import build_bundle, parse_options

    exporter = Path(__file__).resolve().parents[1] / "lddm_export"
    digest = hashlib.sha256(sha256_file(ckpt).encode())
    for name in EXPORT_SOURCES:
        digest.update((exporter / name).read_bytes())
    out = Path(cache_dir) / f"{ckpt.stem}-{digest.hexdigest()[:16]}"
    if not (out / "manifest.json").is_file():
        build_bundle(ckpt, out, parse_options("fp32,fp16", engines="off", force=True), log=lambda line: None)
        for stale in Path(cache_dir).glob(f"{ckpt.stem}-*"):
            if stale != out and stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
    return out
