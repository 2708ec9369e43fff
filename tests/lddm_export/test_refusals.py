"""The refusal matrix (README "Bad input"): rows not covered by the per-package tests, property
tests over malformed manifests and feeds, and a check that every README row names a real test."""
from __future__ import annotations

import ast
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fixtures import cached_tiny_bundle
from lddm_export.cli import main
from runtimes.bundle import Bundle, validate_manifest
from runtimes.errors import BundleError, ShapeMismatch
from runtimes.spec import graph_specs

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bundles(bundle_cache):
    """Two tiny mdlm bundles built from different checkpoints (for swapping graphs); read only."""
    return [cached_tiny_bundle(bundle_cache, "mdlm", seed=seed) for seed in (0, 1)]


def _invoke(args: list[str]) -> int:
    """Run the CLI in-process through main() (which turns user errors into exit 1); the exit code."""
    try:
        main(args)
    except SystemExit as e:
        return e.code
    return 0


def test_onnx_replaced_by_another_graph_is_refused(bundles, tmp_path, capsys):
    good, other = bundles
    bundle = Path(shutil.copytree(good, tmp_path / "bundle"))
    shutil.copy(other / "onnx" / "denoiser.fp32.onnx", bundle / "onnx" / "denoiser.fp32.onnx")
    code = _invoke(["sample", "--bundle", str(bundle), "--steps", "2", "--num", "2", "--out", str(tmp_path / "s.npy")])
    err = capsys.readouterr().err
    assert code == 1 and "denoiser.fp32.onnx does not match its sha256" in err and "Traceback" not in err
    assert not (tmp_path / "s.npy").exists()


def test_build_into_an_unwritable_place_is_refused(bundles, tmp_path, capsys):
    ckpt = Path(bundles[0]) / "model.pt"
    code = _invoke(["build", "--ckpt", str(ckpt), "--out", "/proc/lddm-bundle", "--engines", "off"])
    err = capsys.readouterr().err
    assert code == 1 and "--out /proc/lddm-bundle" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- properties

MANIFEST_KEYS = ("format", "version", "variant", "config", "shapes", "schedule", "graphs", "head", "batch_profile",
                 "engines", "tokenizer", "checkpoint", "files", "tools")
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                           lambda children: st.lists(children, max_size=3)
                           | st.dictionaries(st.text(max_size=6), children, max_size=3), max_leaves=8)


@pytest.fixture(scope="module")
def good_manifest(bundles) -> dict:
    return json.loads((Path(bundles[0]) / "manifest.json").read_text())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_malformed_manifests_raise_bundle_error_only(good_manifest, data):
    """Damage a real manifest (drop, replace or retype a key, or a nested value): validation
    either accepts it or raises BundleError, never any other exception."""
    manifest = json.loads(json.dumps(good_manifest))
    key = data.draw(st.sampled_from(MANIFEST_KEYS))
    action = data.draw(st.sampled_from(["drop", "replace", "nested"]))
    if action == "drop":
        del manifest[key]
    elif action == "replace":
        manifest[key] = data.draw(json_values)
    elif isinstance(manifest[key], dict) and manifest[key]:
        inner = data.draw(st.sampled_from(sorted(manifest[key])))
        manifest[key][inner] = data.draw(json_values)
    try:
        validate_manifest(manifest, Path("manifest.json"))
    except BundleError as e:
        assert str(e).startswith("manifest manifest.json") and "\n" not in str(e)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=40) | st.text(max_size=40).map(str.encode))
def test_manifest_that_is_not_json_is_a_bundle_error(good_manifest, tmp_path_factory, raw):
    root = tmp_path_factory.mktemp("m")
    (root / "manifest.json").write_bytes(raw)
    try:
        Bundle.open(root, check_hashes=False)
    except BundleError:
        return
    pytest.fail(f"{raw!r} was accepted as a manifest")


SPEC = graph_specs("fuji", 8, 2, 4, 5, 8)["denoiser"]
DTYPES = [torch.int64, torch.int32, torch.float32, torch.float16, torch.float64]


@settings(max_examples=200, deadline=None)
@given(batch=st.integers(1, 4), dims=st.none() | st.lists(st.integers(0, 9), min_size=0, max_size=4),
       dtype=st.sampled_from(DTYPES), name=st.sampled_from(["x_t", "y_t", "t"]),
       extra=st.booleans(), max_batch=st.none() | st.integers(1, 4))
def test_feeds_are_accepted_exactly_when_they_match_the_spec(batch, dims, dtype, name, extra, max_batch):
    """Replace one input of a good feed by a tensor of random (or the right) shape and random
    dtype: check_feed accepts it only if it matches the spec, else raises ShapeMismatch."""
    good = {s.name: torch.zeros(s.concrete_shape(batch), dtype=getattr(torch, s.dtype)) for s in SPEC.inputs}
    expected = {s.name: s for s in SPEC.inputs}[name]
    dims = expected.concrete_shape(batch) if dims is None else dims
    feed = dict(good, **{name: torch.zeros(dims, dtype=dtype)})
    if extra:
        feed["unexpected"] = torch.zeros(1)
    matches = (not extra and dtype == getattr(torch, expected.dtype)
               and tuple(dims) == expected.concrete_shape(batch) and (max_batch is None or batch <= max_batch))
    try:
        assert SPEC.check_feed(feed, max_batch) == batch and matches
    except ShapeMismatch as e:
        assert not matches and "\n" not in str(e)


# ----------------------------------------------------------------------------- the README table

def test_every_readme_refusal_row_names_an_existing_test():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Bad input", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| input")]
    assert len(rows) >= 20
    defined = {f"{path.name}::{node.name}" for path in (ROOT / "tests").rglob("test_*.py")
               for node in ast.parse(path.read_text()).body if isinstance(node, ast.FunctionDef)}
    for row in rows:
        named = re.findall(r"`(test_\w+\.py::test_\w+)`", row)
        assert named, f"README row without a test: {row}"
        assert set(named) <= defined, f"README row names a missing test: {set(named) - defined}"


def test_corpus_that_is_not_utf8_text_is_refused(tmp_path):
    import subprocess
    import sys

    corpus = tmp_path / "binary.txt"
    corpus.write_bytes(b"to be or not\n" + bytes(range(128, 256)) * 4)
    out = tmp_path / "model.pt"
    result = subprocess.run([sys.executable, "-m", "training.cli", "--variant", "mdlm", "--data", f"text:{corpus}",
                             "--max-steps", "1", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is not UTF-8 text" in result.stderr and "tokenizer cannot encode it" in result.stderr
    assert not out.exists()
