"""The checkpoint format of docs/design.md: a plain dict saved with torch.save, loaded weights_only.

    {"format": "lddm-checkpoint", "version": 1, "config": {...}, "state_dict": {...},
     "tokenizer": {...} | None, "train": {...}}

load_checkpoint refuses anything else with one sentence that names the file and the problem:
every value is checked (the config by ModelConfig, the weights' names and dtypes, the tokenizer
entry, the train record), and the model's memory is estimated from the config on the meta device
and refused above a bound before anything is allocated.
"""
from __future__ import annotations

import dataclasses
import pickle
import re
import reprlib
import warnings
import zipfile
from pathlib import Path

import torch

from runtimes.fileio import check_input_file, write_atomic
from runtimes.tokenizer import tokenizer_problem
from training.config import ConfigError, ModelConfig
from training.model import LDDM, graph_modules

FORMAT = "lddm-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("format", "version", "config", "state_dict", "tokenizer", "train")
# The largest model (parameters and buffers, float32) load_checkpoint builds unless told otherwise:
# about four times the largest preset ("base": 1 GiB as seq). A build holds several copies of the
# weights (the checkpoint's, the model's, the ONNX graphs'), so this is already a machine with
# tens of GiB; a config of width 10**9 must be refused, not allocated.
MAX_MODEL_GIB = 4.0


class CheckpointError(ValueError):
    """A checkpoint file cannot be used; the message names the file and the fix."""


def save_checkpoint(path: str | Path, model: LDDM, tokenizer: dict | None, train: dict) -> None:
    """Write atomically (runtimes.fileio.write_atomic), so an interrupted save never leaves half a file.

    Raises:
        WriteError: the parent directory is missing, `path` is not a regular file, or the disk is full.
    """
    ckpt = {"format": FORMAT, "version": VERSION, "config": model.cfg.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "tokenizer": tokenizer, "train": train}
    write_atomic(path, lambda f: torch.save(ckpt, f), "the checkpoint")


def read_checkpoint(path: str | Path) -> dict:
    """Load and validate the checkpoint dict (no model built). Raises CheckpointError."""
    path = Path(path)
    check_input_file(path, "checkpoint", "pass the model.pt written by lddm-train", CheckpointError)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it is about to refuse
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if zipfile.is_zipfile(path) or _is_pickle(path):
            refused = re.search(r"GLOBAL ([\w.]+)", str(e))
            what = f"the global {refused.group(1)}" if refused else "objects other than tensors and plain data"
            raise CheckpointError(f"checkpoint {path} holds {what}, which a weights-only load refuses; it was "
                                  f"not executed; pass a model.pt written by lddm-train") from None
        raise CheckpointError(f"checkpoint {path} is not a torch file; pass a model.pt written by lddm-train") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {path} is truncated or not a torch file ({type(e).__name__}); "
            f"re-copy it or re-run lddm-train") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        got = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"checkpoint {path} is not an lddm checkpoint (format {got!r}, "
                              f"expected {FORMAT!r}); pass a model.pt written by lddm-train")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {ckpt.get('version')!r}, but this "
                              f"lddm-export reads version {VERSION}; re-export it with a matching lddm-train")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks the keys {missing}; re-save it with lddm-train")
    weights = ckpt["state_dict"]
    if not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in weights.items()):
        raise CheckpointError(f"checkpoint {path} has a state_dict that is not a dict of named tensors; "
                              f"re-save it with lddm-train")
    bad = [f"{k} ({v.dtype})" for k, v in weights.items() if not v.is_floating_point()]
    if bad:
        raise CheckpointError(f"checkpoint {path} has weights of a non-floating dtype in {bad[:3]}"
                              f"{' and more' if len(bad) > 3 else ''}; the model's weights are floats, so "
                              f"re-save it with lddm-train")
    train = ckpt["train"]
    if not isinstance(train, dict) or not isinstance(train.get("data"), (str, type(None))):
        raise CheckpointError(f"checkpoint {path} has a malformed train record {reprlib.repr(train)}; expected "
                              f"a dict whose data is a string or None; re-save it with lddm-train")
    return ckpt


def read_config(path: str | Path, ckpt: dict) -> ModelConfig:
    """The checkpoint's ModelConfig, every field of its declared type and range, and its
    tokenizer entry fitting it. Raises CheckpointError."""
    raw = ckpt["config"]
    try:
        if not isinstance(raw, dict):
            raise ConfigError(f"the config is {reprlib.repr(raw)}, not a dict")
        cfg = ModelConfig.from_dict(raw)
        for f in dataclasses.fields(cfg):  # ModelConfig takes true for a number and "yes" for a bool
            value = getattr(cfg, f.name)
            if (f.type == "bool") != isinstance(value, bool):
                raise ConfigError(f"{f.name} must be {'true or false' if f.type == 'bool' else 'a ' + f.type}, "
                                  f"got {value!r}")
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} has an invalid config: {e}") from None
    problem = tokenizer_problem(ckpt["tokenizer"], cfg.vocab_size)
    if problem:
        raise CheckpointError(f"checkpoint {path} has a tokenizer entry that {problem}; re-save it with lddm-train")
    return cfg


def model_gib(cfg: ModelConfig) -> float:
    """GiB of the parameters and buffers LDDM(cfg) allocates, measured on the meta device (no memory).

    Raises:
        RuntimeError, OverflowError or TypeError: from torch, for sizes beyond int64.
    """
    with torch.device("meta"):
        meta = LDDM(cfg)
    tensors = list(meta.parameters()) + list(meta.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 2**30


def load_checkpoint(path: str | Path, check_finite: bool = True,
                    max_model_gib: float = MAX_MODEL_GIB) -> tuple[LDDM, dict]:
    """Rebuild the model (eval mode, CPU) from a checkpoint.

    Args:
        path: the checkpoint (model.pt).
        check_finite: refuse NaN or Inf weights.
        max_model_gib: refuse a config whose model (float32 parameters and buffers) is larger,
            before anything is allocated.
    Returns:
        (model, checkpoint dict).
    Raises:
        CheckpointError: one sentence naming the file, the problem and the fix.
    """
    ckpt = read_checkpoint(path)
    cfg = read_config(path, ckpt)
    blocks = cfg.depth + cfg.encoder_depth + cfg.latent_depth
    if blocks > len(ckpt["state_dict"]):  # each block has weights; also bounds the meta model's build time
        raise CheckpointError(f"checkpoint {path} weights do not match its config (it asks for {blocks} transformer "
                              f"blocks but holds {len(ckpt['state_dict'])} tensors)")
    try:
        size = model_gib(cfg)
    except (RuntimeError, OverflowError, TypeError):
        raise CheckpointError(f"checkpoint {path} has a config whose model is too large to build (its tensor "
                              f"sizes overflow 64 bits); check its sizes") from None
    if size > max_model_gib:
        raise CheckpointError(f"checkpoint {path} has a config whose model needs {size:.3g} GiB, above the "
                              f"limit of {max_model_gib:g} GiB; check its sizes, or raise the limit with "
                              f"--max-model-gib")
    model = LDDM(cfg)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise CheckpointError(f"checkpoint {path} weights do not match its config ({first[:160]})") from None
    if check_finite:
        bad = [k for k, v in ckpt["state_dict"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise CheckpointError(f"checkpoint {path} has NaN or Inf weights in {bad[:3]}"
                                  f"{' and more' if len(bad) > 3 else ''}; retrain or restore an earlier checkpoint")
    return model.eval(), ckpt


def load_reference_graphs(path: str | Path) -> tuple[str, dict[str, torch.nn.Module]]:
    """The checkpoint's variant and its graphs' reference modules (training.model.graph_modules).

    This is the loader the torch backend of runtimes is given (make_runners(..., reference=
    load_reference_graphs)): runtimes imports nothing from training. Raises CheckpointError.
    """
    model, _ = load_checkpoint(path)
    return model.cfg.variant, graph_modules(model)


def _is_pickle(path: Path) -> bool:
    """A raw pickle (protocol 2+) starts with the PROTO opcode 0x80 and the protocol number."""
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5
