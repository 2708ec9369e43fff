"""lddm-export verify: passes on a good bundle, fails naming what broke on a bad one."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from fixtures import cached_full_bundle, tiny_checkpoint, tiny_config
from lddm_export.build import build_bundle, parse_options
from lddm_export.manifest import read_manifest, write_manifest
from lddm_export.verify import VerifyOptions, verify_bundle
from runtimes.errors import BundleError, ToleranceExceeded
from training.checkpoint import CheckpointError

FAST = VerifyOptions(steps=4, latent_steps=4, trajectory_samples=4, distribution_samples=32, batch_size=32)


@pytest.fixture(scope="module")
def built(bundle_cache):
    """A tiny seq bundle (every kind of graph) built by the real build, and its checkpoint."""
    return cached_full_bundle(bundle_cache, "seq")


@pytest.fixture
def bundle_copy(built, tmp_path):
    bundle, ckpt = built
    copy = Path(shutil.copytree(bundle, tmp_path / "bundle"))
    (copy / "parity.json").unlink(missing_ok=True)  # a report from an earlier test
    return copy, ckpt


def _rewrite_onnx(bundle: Path, graph: str, precision: str, edit) -> None:
    """Change one graph's weights as a faulty exporter would, and re-hash the manifest."""
    path = bundle / "onnx" / f"{graph}.{precision}.onnx"
    model = onnx.load(path)
    edit(model)
    onnx.save(model, path)
    write_manifest(bundle, read_manifest(bundle))


def _head_weight(model: onnx.ModelProto) -> onnx.TensorProto:
    """The token head's weight matrix ([W, V]): the last 2-D float initializer a MatMul reads."""
    matmul_inputs = {i for n in model.graph.node if n.op_type == "MatMul" for i in n.input}
    return [i for i in model.graph.initializer if i.name in matmul_inputs and len(i.dims) == 2][-1]


def test_good_bundle_passes_and_writes_parity_json(built):
    bundle, ckpt = built
    report = verify_bundle(bundle, ckpt, FAST, log=lambda line: None)
    assert report["passed"] and not report["failures"]
    written = json.loads((bundle / "parity.json").read_text())
    assert set(written["graphs"]["fp32"]) == {"encoder", "latent_denoiser", "token_denoiser", "trunk", "head"}
    assert written["trajectory"]["fp32"]["final_token_agreement"] >= 0.999
    assert written["trajectory"]["fp32"]["prompted_final_token_agreement"] >= 0.999   # one prompted case
    assert {s["prompted"] for s in written["trajectory"]["fp32"]["steps"]} == {False, True}
    assert written["graphs"]["fp16"]["token_denoiser"]["outputs"]["log_probs"]["kl"] is not None


def test_a_prompt_aware_seq_bundle_passes_with_its_clamped_input(bundle_cache):
    bundle, ckpt = cached_full_bundle(bundle_cache, "seq", prompt_latent=True)
    report = verify_bundle(bundle, ckpt, FAST, log=lambda line: None)
    assert report["passed"] and not report["failures"]
    written = json.loads((bundle / "parity.json").read_text())
    assert written["graphs"]["fp16"]["latent_denoiser"]["passed"]
    assert written["trajectory"]["fp32"]["prompted_final_token_agreement"] >= 0.999


def _scale_head_by_one_percent(model: onnx.ModelProto) -> None:
    w = _head_weight(model)
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1.01, w.name))


def test_weight_scaled_by_one_percent_fails_naming_graph_and_output(bundle_copy):
    bundle, ckpt = bundle_copy
    _rewrite_onnx(bundle, "token_denoiser", "fp32", _scale_head_by_one_percent)
    with pytest.raises(ToleranceExceeded, match=r"token_denoiser\.log_probs: max_rel"):
        verify_bundle(bundle, ckpt, FAST, log=lambda line: None)
    report = json.loads((bundle / "parity.json").read_text())
    assert not report["passed"] and not report["graphs"]["fp32"]["token_denoiser"]["passed"]
    assert report["graphs"]["fp32"]["encoder"]["passed"]


def test_nan_output_fails(bundle_copy):
    bundle, ckpt = bundle_copy

    def poison(model):
        w = _head_weight(model)
        array = numpy_helper.to_array(w).copy()
        array[0, 0] = np.nan
        w.CopyFrom(numpy_helper.from_array(array, w.name))

    _rewrite_onnx(bundle, "latent_denoiser", "fp16", poison)
    with pytest.raises(ToleranceExceeded, match=r"latent_denoiser\.y0_hat: \d+ NaN/Inf"):
        verify_bundle(bundle, ckpt, FAST, log=lambda line: None)


def test_manifest_hash_mismatch_is_refused_before_measuring(bundle_copy):
    bundle, ckpt = bundle_copy
    path = bundle / "onnx" / "encoder.fp32.onnx"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(BundleError, match="encoder.fp32.onnx does not match its sha256"):
        verify_bundle(bundle, ckpt, FAST, log=lambda line: None)
    assert not (bundle / "parity.json").exists()


def test_other_checkpoint_is_refused(built, tmp_path):
    bundle, _ = built
    other = tiny_checkpoint(tmp_path / "other.pt", "seq", seed=1)
    with pytest.raises(BundleError, match="is not the one bundle .* was built from"):
        verify_bundle(bundle, other, FAST, log=lambda line: None)


def test_cli_exit_code_and_message(bundle_copy):
    bundle, ckpt = bundle_copy
    _rewrite_onnx(bundle, "token_denoiser", "fp32", _scale_head_by_one_percent)
    cmd = [sys.executable, "-m", "lddm_export.cli", "verify", "--bundle", str(bundle), "--ckpt", str(ckpt),
           "--precision", "fp32", "--steps", "2", "--latent-steps", "2", "--samples", "16"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "token_denoiser.log_probs" in result.stderr and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- text bundles

@pytest.fixture(scope="module")
def text_built(tmp_path_factory):
    """A tiny FUJI text bundle (BPE tokenizer), its checkpoint and an AR evaluator of the same tokenizer."""
    root = tmp_path_factory.mktemp("verify-text")
    ckpt = tiny_checkpoint(root / "model.pt", "fuji", text=True)
    evaluator = tiny_checkpoint(root / "ar.pt", "ar", text=True)
    bundle = build_bundle(ckpt, root / "bundle", parse_options(engines="off"), log=lambda line: None)
    return bundle, ckpt, evaluator


def test_text_bundle_is_judged_by_generative_perplexity(text_built):
    bundle, ckpt, evaluator = text_built
    options = VerifyOptions(**{**FAST.__dict__, "evaluator": str(evaluator)})
    report = verify_bundle(bundle, ckpt, options, log=lambda line: None)
    metrics = report["distribution"]["metrics"]
    assert set(metrics) == {"gen_ppl", "unigram_entropy"} and report["passed"]
    assert metrics["gen_ppl"]["margin"] == 0.02 and metrics["gen_ppl"]["reference"] > 1.0
    assert set(metrics["gen_ppl"]["precisions"]) == {"fp32", "fp16"}


def _ar_with_another_bpe(path: Path) -> Path:
    """An AR checkpoint whose BPE is trained on other text than the bundle's."""
    from training.checkpoint import save_checkpoint
    from training.data import tokenizer_entry, train_bpe_tokenizer
    from training.model import LDDM

    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "lambda"]
    lines = [" ".join(words[(i * 7 + j) % 8] + str(i % 13) for j in range(6)) for i in range(400)]
    entry = tokenizer_entry(train_bpe_tokenizer(lines, 280), "bpe")
    save_checkpoint(path, LDDM(tiny_config("ar", vocab_size=entry["vocab_size"])), entry, {"steps": 0})
    return path


def test_text_bundle_needs_an_ar_evaluator_of_its_tokenizer(text_built, tmp_path):
    bundle, ckpt, evaluator = text_built

    def verify_with(path):
        options = VerifyOptions(**{**FAST.__dict__, "evaluator": None if path is None else str(path)})
        verify_bundle(bundle, ckpt, options, log=lambda line: None)

    with pytest.raises(BundleError, match="holds a text model; pass --evaluator"):
        verify_with(None)
    with pytest.raises(CheckpointError, match="is a directory, not a file"):
        verify_with(tmp_path)
    with pytest.raises(BundleError, match="is a fuji model, not an AR model"):
        verify_with(ckpt)
    with pytest.raises(BundleError, match="uses another tokenizer"):
        verify_with(tiny_checkpoint(tmp_path / "ar-no-tokenizer.pt", "ar"))
    with pytest.raises(BundleError, match="uses another tokenizer"):
        verify_with(_ar_with_another_bpe(tmp_path / "ar-other-bpe.pt"))
    with pytest.raises(BundleError, match="scores sequences of 8 tokens"):
        verify_with(tiny_checkpoint(tmp_path / "ar-short.pt", "ar", text=True, seq_len=8))
