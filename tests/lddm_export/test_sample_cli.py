"""`lddm-export sample` end to end, and every bad input: one sentence, exit 1, no traceback."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fixtures import cached_tiny_bundle, copy_bundle, run_sample, tiny_checkpoint
from lddm_export.cli import main
from training import sampling
from training.checkpoint import load_checkpoint


def refused(capsys, out, *args) -> str:
    """Assert a refusal: exit 1, one 'lddm-export: error:' sentence, no traceback, nothing written."""
    code, err = run_sample(capsys, "--out", out, *args)
    message = [line for line in err.splitlines() if line.startswith("lddm-export: error:")]
    assert code == 1 and len(message) == 1, err
    assert "Traceback" not in err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))
    return message[0]


@pytest.fixture(scope="module")
def seq_bundle(bundle_cache):  # noqa: F811
    return cached_tiny_bundle(bundle_cache, "seq")


def test_npy_holds_int64_ids_and_matches_the_reference_sampler(capsys, tmp_path, seq_bundle):
    out = tmp_path / "samples.npy"
    code, _ = run_sample(capsys, "--bundle", seq_bundle, "--backend", "torch", "--steps", 3, "--latent-steps", 2,
                      "--num", 5, "--batch-size", 2, "--seed", 9, "--out", out)
    assert code == 0
    tokens = np.load(out)
    assert tokens.dtype == np.int64 and tokens.shape == (5, 16)
    model, _ = load_checkpoint(seq_bundle / "model.pt")
    ref = sampling.sample(model, 9, 5, 3, latent_steps=2, batch_size=2)
    np.testing.assert_array_equal(tokens, ref.tokens.numpy())
    assert not list(tmp_path.glob(".*"))  # the temp file was renamed, none left


def test_compile_flag_gives_the_same_samples(capsys, tmp_path, seq_bundle):
    """--compile (here the token step only: the ort backend) changes the kernels, not the draws."""
    eager, compiled = tmp_path / "eager.npy", tmp_path / "compiled.npy"
    args = ("--bundle", seq_bundle, "--steps", 3, "--num", 6, "--batch-size", 3, "--seed", 2)
    assert run_sample(capsys, *args, "--out", eager)[0] == 0
    assert run_sample(capsys, *args, "--compile", "--out", compiled)[0] == 0
    assert (np.load(eager) == np.load(compiled)).mean() >= 0.999


def test_seq_latent_steps_default_to_steps(capsys, tmp_path, seq_bundle):
    default, explicit = tmp_path / "a.npy", tmp_path / "b.npy"
    code, err = run_sample(capsys, "--bundle", seq_bundle, "--steps", 3, "--num", 4, "--out", default)
    assert code == 0 and "sample seq (ort): 6/6 steps (100%)" in err  # 3 latent + 3 token steps
    assert "\r" not in err and err.count("6/6 steps") == 1  # not a terminal: plain lines, the end once
    assert run_sample(capsys, "--bundle", seq_bundle, "--steps", 3, "--latent-steps", 3, "--num", 4,
                   "--out", explicit)[0] == 0
    np.testing.assert_array_equal(np.load(default), np.load(explicit))


def test_jsonl_holds_ids_and_text(capsys, tmp_path, bundle_cache):  # noqa: F811
    sawtooth = cached_tiny_bundle(bundle_cache, "mdlm")
    text = cached_tiny_bundle(bundle_cache, "mdlm", text=True)
    for bundle, has_text in ((sawtooth, False), (text, True)):
        out = tmp_path / f"{has_text}.jsonl"
        assert run_sample(capsys, "--bundle", bundle, "--steps", 4, "--num", 3, "--out", out)[0] == 0
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert len(rows) == 3 and all(len(r["ids"]) == 16 for r in rows)
        if has_text:
            from training.data import decode_ids
            manifest = json.loads((bundle / "manifest.json").read_text())
            assert [r["text"] for r in rows] == decode_ids(manifest["tokenizer"], [r["ids"] for r in rows])
            assert all(isinstance(r["text"], str) and r["text"] for r in rows)
        else:
            assert all(r["text"] is None for r in rows)


@pytest.mark.parametrize("args,match", [
    (("--steps", 0, "--num", 2), "--steps must be a positive integer, got 0"),
    (("--steps", -3, "--num", 2), "--steps must be a positive integer, got -3"),
    (("--steps", 2, "--num", 0), "--num must be a positive integer, got 0"),
    (("--steps", 2, "--num", 2, "--latent-steps", 0), "--latent-steps must be a positive integer"),
    (("--steps", 2, "--num", 2, "--batch-size", 65), "--batch-size 65 is above the bundle's batch profile maximum 64"),
    (("--steps", 2, "--num", 2, "--backend", "jax"), "backend 'jax' is unknown; choose one of torch, ort, ort-trt, trt"),
    (("--steps", 2, "--num", 2, "--precision", "bf16"), "precision 'bf16' is unknown; choose one of fp32, fp16, int8"),
    (("--steps", 2, "--num", 2, "--precision", "int8"), "has no int8 graph"),
    (("--steps", 2, "--num", 2, "--backend", "torch", "--precision", "int8"), "the torch backend (the reference"),
    (("--steps", 2, "--num", 2, "--head", "wide"), "Invalid value for '--head'"),
    (("--steps", 2, "--num", 2, "--device", "mps"), "device 'mps' is unknown; choose one of cpu, cuda, cuda:N"),
    (("--steps", 2, "--num", 2, "--backend", "torch", "--precision", "fp16"), "fp16 is CUDA autocast"),
    (("--steps", 2, "--num", 2, "--precision", "fp16"), "has no fp16 graph"),
])
def test_bad_arguments_are_refused(capsys, tmp_path, seq_bundle, args, match):
    assert match in refused(capsys, tmp_path / "x.npy", "--bundle", seq_bundle, *args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of cuda on a machine without a GPU")
def test_cuda_without_a_gpu_is_refused(capsys, tmp_path, seq_bundle):
    message = refused(capsys, tmp_path / "x.npy", "--bundle", seq_bundle, "--steps", 2, "--num", 2, "--device", "cuda")
    assert "torch sees no CUDA GPU" in message


def test_latent_steps_on_a_non_seq_bundle_is_refused(capsys, tmp_path, bundle_cache):  # noqa: F811
    message = refused(capsys, tmp_path / "x.npy", "--bundle", cached_tiny_bundle(bundle_cache, "fuji"),
                      "--steps", 2, "--num", 2, "--latent-steps", 2)
    assert "--latent-steps applies to seq bundles only" in message


def test_bad_outputs_are_refused(capsys, tmp_path, seq_bundle):
    base = ("--bundle", seq_bundle, "--steps", 2, "--num", 2)
    assert "use one of .npy, .jsonl" in refused(capsys, tmp_path / "x.csv", *base)
    assert "does not exist" in refused(capsys, tmp_path / "missing" / "x.npy", *base)
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert "is a file, not a directory" in refused(capsys, a_file / "x.npy", *base)


def test_torch_backend_without_its_checkpoint_is_refused(capsys, tmp_path, seq_bundle):
    root = copy_bundle(seq_bundle, tmp_path / "bundle")
    base = ("--bundle", root, "--backend", "torch", "--steps", 2, "--latent-steps", 2, "--num", 2)
    moved = tmp_path / "moved.pt"
    (root / "model.pt").rename(moved)
    assert "pass the bundle's model.pt with --ckpt" in refused(capsys, tmp_path / "x.npy", *base)
    tiny_checkpoint(root / "model.pt", "seq", seed=7)  # a different model at the recorded path
    assert "sha256 differs" in refused(capsys, tmp_path / "x.npy", *base)
    out = tmp_path / "ok.npy"
    assert run_sample(capsys, *base, "--ckpt", moved, "--out", out)[0] == 0 and np.load(out).shape == (2, 16)


def test_a_damaged_bundle_is_refused(capsys, tmp_path, seq_bundle):
    root = copy_bundle(seq_bundle, tmp_path / "bundle")
    onnx_file = root / "onnx" / "token_denoiser.fp32.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:-10])
    message = refused(capsys, tmp_path / "x.npy", "--bundle", root, "--steps", 2, "--num", 2)
    assert "does not match its sha256" in message


def test_bench_prints_a_table_and_writes_json(capsys, tmp_path, seq_bundle):
    out = tmp_path / "bench.json"
    main_args = ["bench", "--bundle", str(seq_bundle), "--batch", "1,2", "--steps", "2", "--repeat", "1",
                 "--threads", "1", "--json", str(out)]
    main(main_args)
    table, err = capsys.readouterr()
    # progress until the table: 2 batches x (2 warm-ups + 2 timed + 3 instrumented) calls
    assert err.splitlines()[-1].startswith("bench seq (ort fp32): 14/14 calls (100%), ")
    rows = json.loads(out.read_text())
    assert [r["batch"] for r in rows] == [1, 2] and all(r["steps"] == 4 for r in rows)  # seq: 2 latent + 2 token
    assert all(r["runtime_ms_per_step"] > 0 and r["reference_ms_per_step"] > 0 for r in rows)
    assert all(r["sampler_overhead"] > -1 for r in rows)
    assert table.count("| seq | ort-cpu | fp32 |") == 2


@pytest.mark.parametrize("args,match", [
    (("--batch", "1,x"), "--batch '1,x' must be positive integers"),
    (("--batch", "128"), "--batch 128 is above the bundle's batch profile maximum 64"),
    (("--steps", "0"), "--steps must be a positive integer, got 0"),
    (("--backend", "onnx"), "backend 'onnx' is unknown"),
])
def test_bench_refuses_bad_arguments(capsys, seq_bundle, args, match):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--bundle", str(seq_bundle), "--repeat", "1", *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and match in err and "Traceback" not in err
