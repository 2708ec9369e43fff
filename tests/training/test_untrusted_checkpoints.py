"""Untrusted checkpoints (issue 11, class 3): damage a real checkpoint, run `lddm-export build`.

A hypothesis layer damages the config (every field: wrong type, zero, negative, NaN, out of
range, absurdly large; heads that do not divide the width; unknown keys), the weights (a
non-floating dtype, a non-tensor, a wrong shape), the tokenizer entry and the train record, and
runs the real `lddm-export build --ckpt` in-process (lddm_export.cli.main). Each must end with
exit 1, one sentence naming the checkpoint on stderr, no traceback, and nothing written (no
--out, no temporary directory beside it). The model's memory is estimated on the meta device
and refused above a bound before anything is allocated.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import re
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures import tiny_checkpoint
from lddm_export.cli import main
from training.checkpoint import CheckpointError, load_checkpoint
from training.config import LATENT_LAYOUTS, LATENT_SCHEDULES, MASK_SCHEDULES, VARIANTS, ModelConfig

SETTINGS = settings(max_examples=8, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FIELDS = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
EPS_RANGES = {"mask_eps": (0.0, 1.0), "latent_eps": (0.0, 0.5)}   # open intervals


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("untrusted-checkpoints")


@pytest.fixture(scope="module")
def good(work) -> dict:
    """A tiny fuji checkpoint as a dict (every graph kind: encoder, joint denoiser)."""
    return torch.load(tiny_checkpoint(work / "good.pt", "fuji"), weights_only=True)


def build(ckpt: Path, out: Path) -> tuple[int, str]:
    """`lddm-export build` in-process: (exit code, stderr). An exception main lets through fails the test."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            main(["build", "--ckpt", str(ckpt), "--out", str(out), "--precision", "fp32", "--engines", "off",
                  "--no-calibrate"])
        return 0, err.getvalue()
    except SystemExit as e:
        return e.code, err.getvalue()


def assert_refused(ckpt: dict, work: Path) -> str:
    """Save the damaged checkpoint, build it: exit 1, one sentence, no traceback, nothing written."""
    folder = work / f"case-{time.monotonic_ns()}"
    folder.mkdir()
    torch.save(ckpt, folder / "model.pt")
    code, err = build(folder / "model.pt", folder / "bundle")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, f"exit {code}, stderr {err!r}"
    assert lines[0].startswith(f"lddm-export: error: checkpoint {folder / 'model.pt'} ") and "Traceback" not in err
    assert sorted(os.listdir(folder)) == ["model.pt"], "the build left something behind"
    return lines[0]


# ----------------------------------------------------------------------------- damage

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6)


def bad_value(name: str, value):
    """A strategy of values for config field `name` that no valid, weight-compatible config has.

    Valid positive integers are left out (heads 1 instead of 2 is a valid config the weights
    cannot tell apart), except the absurdly large, which the memory bound must refuse.
    """
    kind = FIELDS[name]
    if kind == "int":
        return (st.sampled_from([0, -1, 2.0, "4", True, None, [4]]) | st.integers(max_value=0)
                | st.integers(min_value=10**9, max_value=2**80) | st.floats(allow_nan=True))
    if kind == "float":
        low, high = EPS_RANGES.get(name, (-0.0, 1.0))   # encoder_input_corruption: [0, 1]
        closed = name not in EPS_RANGES
        return (st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([True, False, "0.1", None, [0.1]])).filter(
            lambda v: not (isinstance(v, float) and (low <= v <= high if closed else low < v < high)))
    if kind == "bool":
        return scalars.filter(lambda v: not isinstance(v, bool))
    choices = {"variant": VARIANTS, "mask_schedule": MASK_SCHEDULES, "latent_schedule": LATENT_SCHEDULES,
               "latent_layout": LATENT_LAYOUTS}[name]
    return scalars.filter(lambda v: v not in choices) if name != "variant" else scalars.filter(lambda v: v != "fuji")


def damage_config_field(ckpt: dict, draw) -> None:
    name = draw(st.sampled_from(sorted(FIELDS)))
    ckpt["config"][name] = draw(bad_value(name, ckpt["config"][name]))


def damage_config(ckpt: dict, draw) -> None:
    """heads that do not divide the width, unknown keys, or not a dict at all."""
    what = draw(st.sampled_from(["heads", "unknown", "not a dict"]))
    if what == "heads":
        ckpt["config"]["heads"] = draw(st.sampled_from([3, 5, 7, 32, 64]))    # width 32: 3, 5, 7 do not divide; 32, 64 odd or no head dim
    elif what == "unknown":
        ckpt["config"][draw(st.text(min_size=1, max_size=6).filter(lambda k: k not in FIELDS))] = draw(scalars)
    else:
        ckpt["config"] = draw(scalars | st.lists(scalars, max_size=2))


def damage_weights(ckpt: dict, draw) -> None:
    """One weight of a non-floating dtype, not a tensor, of another shape; or no dict of tensors."""
    weights = ckpt["state_dict"]
    name = draw(st.sampled_from(sorted(weights)))
    what = draw(st.sampled_from(["dtype", "not a tensor", "shape", "state_dict"]))
    if what == "dtype":
        dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool, torch.complex64]))
        weights[name] = weights[name].to(dtype)
    elif what == "not a tensor":
        weights[name] = draw(scalars | st.lists(st.integers(), max_size=3))
    elif what == "shape":
        weights[name] = torch.zeros(weights[name].numel() + draw(st.integers(1, 5)))
    else:
        ckpt["state_dict"] = draw(scalars | st.lists(scalars, max_size=2))


def damage_tokenizer(ckpt: dict, draw) -> None:
    """A tokenizer entry that does not load, has another size, or misses or retypes fields."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    vocab = ckpt["config"]["vocab_size"]
    entry = {"kind": "bpe", "json": Tokenizer(WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0")).to_str(),
             "vocab_size": vocab}
    what = draw(st.sampled_from(["json", "vocab_size", "drop", "not a dict"]))
    if what == "json":
        entry["json"] = draw(st.text(max_size=30) | st.sampled_from(["{}", "null", entry["json"][:-3]]))
    elif what == "vocab_size":
        entry["vocab_size"] = draw(scalars.filter(lambda v: v != vocab or isinstance(v, (bool, float))))
    elif what == "drop":
        del entry[draw(st.sampled_from(sorted(entry)))]
    else:
        entry = draw(st.integers() | st.text(max_size=6) | st.lists(scalars, max_size=2))
    ckpt["tokenizer"] = entry


def damage_train(ckpt: dict, draw) -> None:
    if draw(st.booleans()):
        ckpt["train"] = draw(scalars | st.lists(scalars, max_size=2))
    else:
        ckpt["train"]["data"] = draw(scalars.filter(lambda v: v is not None and not isinstance(v, str)))


DAMAGE = {"config field": damage_config_field, "config": damage_config, "weights": damage_weights,
          "tokenizer": damage_tokenizer, "train": damage_train}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
@SETTINGS
@given(data=st.data())
def test_damaged_checkpoints_are_refused_by_build(good, work, kind, data):
    ckpt = {**good, "config": dict(good["config"]), "state_dict": dict(good["state_dict"]), "train": dict(good["train"])}
    DAMAGE[kind](ckpt, data.draw)
    assert_refused(ckpt, work)


# ----------------------------------------------------------------------------- the issue's examples

@pytest.mark.parametrize("field, value, message", [
    ("heads", 0, "heads must be a positive integer, got 0"),
    ("width", 10**9, r"whose model is too large to build \(its tensor sizes overflow 64 bits\)"),
    ("width", 2**16, "whose model needs .* GiB, above the limit of 4 GiB; .* --max-model-gib"),
    ("depth", 10**9, r"asks for 1000000002 transformer blocks but holds \d+ tensors"),
    ("mask_eps", math.nan, "mask_eps must be a finite number, got nan"),
    ("latent_eps", 0.5, r"latent_eps in \(0, 0.5\)"),
    ("seq_len", 2.0, "seq_len must be a positive integer, got 2.0"),
    ("unit_norm_latent", "yes", "unit_norm_latent must be true or false, got 'yes'"),
])
def test_the_issues_configs_are_refused_before_allocation(good, work, field, value, message):
    started = time.perf_counter()
    line = assert_refused({**good, "config": {**good["config"], field: value}}, work)
    assert re.search(message, line), line
    assert time.perf_counter() - started < 20      # refused from the config, not after allocating 10**9 widths


def test_int64_weights_are_refused(good, work):
    """The issue's example: int64 weights used to build and sample with exit 0."""
    weights = {k: v.to(torch.int64) for k, v in good["state_dict"].items()}
    assert "weights of a non-floating dtype" in assert_refused({**good, "state_dict": weights}, work)


def test_the_memory_bound_is_stated_and_can_be_raised(good, work):
    path = work / "bound.pt"
    torch.save(good, path)
    with pytest.raises(CheckpointError, match=r"above the limit of 1e-06 GiB; .*--max-model-gib"):
        load_checkpoint(path, max_model_gib=1e-6)
    big = work / "big.pt"
    torch.save({**good, "config": {**good["config"], "seq_len": 2**24}}, big)   # its rotary tables: 2 GiB
    with pytest.raises(CheckpointError, match="above the limit of 0.5 GiB"):
        load_checkpoint(big, max_model_gib=0.5)
    model, _ = load_checkpoint(path, max_model_gib=1.0)
    assert model.cfg.variant == "fuji"
