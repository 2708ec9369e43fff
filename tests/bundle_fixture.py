"""Tiny bundles for the runtime tests, in the runtimes/bundle.py format.

`tiny_checkpoint` saves a tiny model of a variant with random (non-trivial) weights: the
zero-initialised adaLN and heads of a fresh model would make every output uniform, and a
parity test on uniform outputs could not fail. `build_tiny_bundle` builds that checkpoint's
FP32 bundle exactly as `lddm-export build --precision fp32 --engines off --no-calibrate` does.

Exports take seconds each, so bundles are cached on disk, keyed by the variant, the sizes
and the sources of the network, the exporter and this file (a change to any rebuilds them).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from runtimes.bundle import sha256_file
from training.checkpoint import save_checkpoint
from training.config import PRESETS, ModelConfig
from training.model import LDDM

TINY = dict(seq_len=16, vocab_size=5, n_latent=2, latent_dim=4, **PRESETS["tiny"])
ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "training" / "model.py", ROOT / "lddm_export" / "export.py", ROOT / "lddm_export" / "build.py",
           Path(__file__)]
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


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


def build_tiny_bundle(out: Path, ckpt: Path) -> Path:
    """The FP32 bundle of `ckpt` at `out`, built by lddm_export.build (no engines, no calibration)."""
    from lddm_export.build import build_bundle, parse_options

    options = parse_options(precision="fp32", engines="off", calibrate=False)
    return build_bundle(ckpt, out, options, log=lambda line: None)


def cached_tiny_bundle(cache_dir: Path, variant: str, seed: int = 0, text: bool = False) -> Path:
    """A tiny bundle of `variant` (checkpoint inside it as model.pt), built once per model source.

    Bundles of older sources (other keys) are removed when a new one is built.
    """
    key = hashlib.sha256(f"{variant}-{seed}-{text}-{sorted(TINY.items())}".encode()
                         + b"".join(source.read_bytes() for source in SOURCES)).hexdigest()[:16]
    prefix = f"{variant}{'-text' if text else ''}-seed{seed}-"
    root = Path(cache_dir) / f"{prefix}{key}"
    if not (root / "manifest.json").is_file():
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{variant}-"))
        tmp = build_tiny_bundle(work / "bundle", tiny_checkpoint(work / "model.pt", variant, seed, text))
        (work / "model.pt").rename(tmp / "model.pt")  # beside the hashed files, not among them
        _repoint_checkpoint(tmp, root / "model.pt")
        try:
            tmp.rename(root)
        except OSError:  # another process finished the same bundle first
            pass
        shutil.rmtree(work, ignore_errors=True)
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
