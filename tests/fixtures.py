"""The test suite's fixtures, for every package's tests: tiny models, checkpoints and bundles.

Tiny models and their exported graphs (the export tests): `random_model` draws every weight at
random (not the zero-initialised adaLN and heads of a fresh model, whose outputs would be
uniform and could not expose an export error); `exported` exports each graph once per process;
`session` and `parity_runs` run them against torch.

Tiny bundles (the runtime tests), in the runtimes/bundle.py format: `tiny_checkpoint` saves a tiny model of a variant with random (non-trivial) weights: the
zero-initialised adaLN and heads of a fresh model would make every output uniform, and a
parity test on uniform outputs could not fail. `build_tiny_bundle` builds that checkpoint's
FP32 bundle exactly as `lddm-export build --precision fp32 --engines off --no-calibrate` does.

Exports take seconds each, so bundles are cached on disk, keyed by the variant, the sizes
and the sources of the network, the exporter and this file (a change to any rebuilds them).
"""
from __future__ import annotations

import functools
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

from lddm_export.build import DEFAULT_OPSET
from lddm_export.export import sample_inputs
from runtimes.fileio import sha256_file
from runtimes.spec import graph_specs
from training.checkpoint import save_checkpoint
from training.config import PRESETS, ModelConfig
from training.model import LDDM, graph_modules

TINY = dict(seq_len=16, vocab_size=5, n_latent=2, latent_dim=4, **PRESETS["tiny"])
OPSET = DEFAULT_OPSET
BATCHES = (1, 3, 8)
TIMES = (0.001, 0.5, 0.999)
ROOT = Path(__file__).resolve().parents[1]
# What a built bundle depends on: cached bundles are rebuilt when any of these changes.
BUILD_SOURCES = [ROOT / rel for rel in (
    "training/model.py", "runtimes/spec.py", "runtimes/bundle.py", "lddm_export/export.py", "lddm_export/fp16.py",
    "lddm_export/build.py", "lddm_export/manifest.py", "calibration/fp16_islands.py", "calibration/trajectories.py")]
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def tiny_config(variant: str, **overrides) -> ModelConfig:
    return ModelConfig(variant=variant, **{**TINY, **overrides})


def tiny_tokenizer_entry() -> dict:
    """A small byte-level BPE trained on the first lines of the offline corpus (or a fallback text)."""
    from training.data import tokenizer_entry, train_bpe_tokenizer

    lines = CORPUS.read_text().splitlines()[:400] if CORPUS.is_file() else ["to be or not to be"] * 50
    return tokenizer_entry(train_bpe_tokenizer([line for line in lines if line.strip()], 300), "bpe")


def perturbed_model(variant: str, scale: float, seed: int = 0, **overrides) -> LDDM:
    """A tiny `variant` model (eval mode) with N(0, scale^2) noise added to every weight."""
    torch.manual_seed(seed)
    model = LDDM(tiny_config(variant, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()


def tiny_checkpoint(path: Path, variant: str, seed: int = 0, text: bool = False, **overrides) -> Path:
    """Save a tiny `variant` model with every weight perturbed by N(0, 0.1^2) noise.

    With text=True the checkpoint records a BPE tokenizer and the vocabulary is its size.
    """
    tokenizer = tiny_tokenizer_entry() if text else None
    if tokenizer is not None:
        overrides = {**overrides, "vocab_size": tokenizer["vocab_size"]}
    model = perturbed_model(variant, 0.1, seed, **overrides)
    save_checkpoint(path, model, tokenizer=tokenizer, train={"steps": 0, "note": "random test weights"})
    return path


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """Run `lddm-export ARGS` in-process; returns (exit code, stdout, stderr)."""
    from lddm_export.cli import main

    code = 0
    try:
        main([*map(str, args)])
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_sample(capsys, *args) -> tuple[int, str]:
    """Run `lddm-export sample ARGS` in-process; returns (exit code, stderr)."""
    code, _, err = run_cli(capsys, "sample", *args)
    return code, err


def build_tiny_bundle(out: Path, ckpt: Path) -> Path:
    """The FP32 bundle of `ckpt` at `out`, built by lddm_export.build (no engines, no calibration)."""
    from lddm_export.build import build_bundle, parse_options

    options = parse_options(precision="fp32", engines="off", calibrate=False)
    return build_bundle(ckpt, out, options, log=lambda line: None)


def _tag(overrides: dict) -> str:
    """The part of a cached file's name that tells config overrides apart ("-prompt_latent")."""
    return "".join(f"-{key}" for key in sorted(overrides))


def cached_tiny_bundle(cache_dir: Path, variant: str, seed: int = 0, text: bool = False, **overrides) -> Path:
    """A tiny bundle of `variant` (checkpoint inside it as model.pt), built once per model source;
    `overrides` change config fields of the tiny model (e.g. prompt_latent=True).

    Bundles of older sources (other keys) are removed when a new one is built.
    """
    key = hashlib.sha256(f"{variant}-{seed}-{text}-{sorted(TINY.items())}-{sorted(overrides.items())}".encode()
                         + b"".join(source.read_bytes() for source in [*BUILD_SOURCES, Path(__file__)])
                         ).hexdigest()[:16]
    prefix = f"{variant}{'-text' if text else ''}{_tag(overrides)}-seed{seed}-"
    root = Path(cache_dir) / f"{prefix}{key}"
    if not (root / "manifest.json").is_file():
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{variant}-"))
        tmp = build_tiny_bundle(work / "bundle", tiny_checkpoint(work / "model.pt", variant, seed, text, **overrides))
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


def built_example_bundle(cache_dir: Path, ckpt: Path) -> Path:
    """The real `lddm-export build` (fp32 + fp16, no engines) of a checkpoint, cached on disk.

    Keyed by the checkpoint's sha256 and the exporter's sources, so a new checkpoint or a
    changed export pass builds afresh.
    """
    from lddm_export.build import build_bundle, parse_options

    digest = hashlib.sha256(sha256_file(ckpt).encode())
    for source in BUILD_SOURCES:
        digest.update(source.read_bytes())
    out = Path(cache_dir) / f"{ckpt.stem}-{digest.hexdigest()[:16]}"
    if not (out / "manifest.json").is_file():
        build_bundle(ckpt, out, parse_options("fp32,fp16", engines="off", force=True), log=lambda line: None)
        for stale in Path(cache_dir).glob(f"{ckpt.stem}-*"):
            if stale != out and stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
    return out


def cached_full_bundle(cache_dir: Path, variant: str, **overrides) -> tuple[Path, Path]:
    """(bundle, checkpoint): the default build (FP32 and calibrated mixed FP16, no engines) of the
    tiny `variant` checkpoint (`overrides`: config fields), built once per cache for every test
    that only reads it."""
    ckpt = Path(cache_dir) / "full" / f"tiny-{variant}{_tag(overrides)}.pt"
    if not ckpt.is_file():
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        tiny_checkpoint(ckpt, variant, **overrides)
    return built_example_bundle(ckpt.parent, ckpt), ckpt


# ----------------------------------------------------------------------------- exported tiny graphs

def random_model(variant: str, seed: int = 0, std: float = 0.2, **sizes) -> LDDM:
    """A tiny model of `variant` (TINY, with `sizes` overriding its fields) with every parameter
    drawn from N(0, std^2)."""
    torch.manual_seed(seed)
    model = LDDM(tiny_config(variant, **sizes)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)
    return model


@functools.lru_cache(maxsize=None)
def exported(variant: str) -> dict:
    """Export every graph of a random tiny `variant` model once per test process.

    Returns:
        graph name -> {"module": torch wrapper, "spec": GraphSpec, "fp32": ModelProto,
        "fp16": ModelProto, "report": MixedPrecisionReport}.
    """
    from lddm_export.export import export_graph
    from lddm_export.fp16 import to_mixed_fp16_with_report

    model = random_model(variant)
    cfg = model.cfg
    specs = graph_specs(variant, cfg.seq_len, cfg.n_latent, cfg.latent_dim, cfg.total_vocab, cfg.width)
    graphs = {}
    for name, module in graph_modules(model).items():
        fp32 = export_graph(module, specs[name], cfg.total_vocab, OPSET)
        fp16, report = to_mixed_fp16_with_report(fp32)
        graphs[name] = {"module": module, "spec": specs[name], "fp32": fp32, "fp16": fp16, "report": report}
    return graphs


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def parity_runs(module: torch.nn.Module, spec, vocab: int, seed: int = 1):
    """Fresh random inputs at every batch in BATCHES and t in TIMES, with the torch outputs.

    Yields:
        (label, feed: input name -> numpy array, ref: output name -> numpy float32 array).
    """
    generator = torch.Generator().manual_seed(seed)
    for batch in BATCHES:
        for t in TIMES:
            args = list(sample_inputs(spec, batch, vocab, generator))
            if "t" in spec.input_names:
                args[spec.input_names.index("t")] = torch.full((batch,), t)
            elif t != TIMES[0]:
                continue  # the encoder has no t: one run per batch
            with torch.no_grad():
                out = module(*args)
            out = out if isinstance(out, tuple) else (out,)
            feed = {s.name: a.numpy() for s, a in zip(spec.inputs, args)}
            ref = {s.name: o.numpy() for s, o in zip(spec.outputs, out)}
            yield f"batch {batch}, t {t}", feed, ref


def tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor of a model (after shape inference)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
    types.update({t.name: t.data_type for t in g.initializer})
    return types
