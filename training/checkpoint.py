"""The checkpoint format of DESIGN.md: a plain dict saved with torch.save, loaded weights_only.

    {"format": "lddm-checkpoint", "version": 1, "config": {...}, "state_dict": {...},
     "tokenizer": {...} | None, "train": {...}}

load_checkpoint refuses anything else with one sentence that names the file and the problem.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from pathlib import Path

import torch

from training.config import ConfigError, ModelConfig
from training.model import LDDM

FORMAT = "lddm-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("format", "version", "config", "state_dict", "tokenizer", "train")


class CheckpointError(ValueError):
    """A checkpoint file cannot be used; the message names the file and the fix."""


def save_checkpoint(path: str | Path, model: LDDM, tokenizer: dict | None, train: dict) -> None:
    """Write atomically (temp file + rename), so an interrupted save never leaves half a file."""
    path = Path(path)
    ckpt = {"format": FORMAT, "version": VERSION, "config": model.cfg.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "tokenizer": tokenizer, "train": train}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; a checkpoint is an ordinary file
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_checkpoint(path: str | Path) -> dict:
    """Load and validate the checkpoint dict (no model built). Raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the model.pt written by lddm-train")
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
    return ckpt


def load_checkpoint(path: str | Path, check_finite: bool = True) -> tuple[LDDM, dict]:
    """Rebuild the model (eval mode, CPU) from a checkpoint. Returns (model, checkpoint dict)."""
    ckpt = read_checkpoint(path)
    try:
        cfg = ModelConfig.from_dict(ckpt["config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} has an invalid config: {e}") from None
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


def _is_pickle(path: Path) -> bool:
    """A raw pickle (protocol 2+) starts with the PROTO opcode 0x80 and the protocol number."""
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
