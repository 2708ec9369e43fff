"""Command-line numbers (one check, runtimes/options.py, with a stated range for every integer
option and the job's size checked up front) and the other inputs of issue 11's class 7: a
directory passed as a file, Ctrl-C or SIGTERM during training, a malformed tokenizer entry."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from fixtures import cached_tiny_bundle, tiny_checkpoint
from lddm_export.cli import main as export_main
from runtimes.options import MAX_NOISE_BYTES, OptionError, check_int, check_job, parse_int_list
from training import trainer
from training.cli import main as train_main


def run(main, argv: list[str], capsys) -> tuple[int, str]:
    """(exit code, the one error line); asserts one line on stderr and no traceback."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(("lddm-export:", "lddm-train:"))]
    assert "Traceback" not in err and len(lines) <= 1, err
    return code, lines[0] if lines else ""


@pytest.fixture(scope="module")
def mdlm_bundle(bundle_cache) -> Path:  # noqa: F811
    return cached_tiny_bundle(bundle_cache, "mdlm")


# ----------------------------------------------------------------------------- the one check

def test_check_int_states_the_range():
    assert check_int("--steps", " 8 ", 1, 10) == 8 and check_int("--seed", 0, 0, 10) == 0
    for value, message in ((0, "--steps must be a positive integer, got 0; pass an integer from 1 to 10"),
                           (11, "--steps 11 is above the limit of 10; pass an integer from 1 to 10"),
                           ("x", "--steps must be an integer, got 'x'; pass an integer from 1 to 10"),
                           (True, "--steps must be an integer, got True"), (2.0, "must be an integer, got 2.0")):
        with pytest.raises(OptionError, match=message.replace("(", r"\(").replace(")", r"\)")):
            check_int("--steps", value, 1, 10)
    with pytest.raises(OptionError, match="--seed must be a non-negative integer, got -1"):
        check_int("--seed", -1, 0, 10)
    assert parse_int_list("--batch", "1, 8,64", 1, 64, "E") == [1, 8, 64]
    with pytest.raises(OptionError, match=r"--batch '1,,2' must be E; '' is not an integer from 1 to 64"):
        parse_int_list("--batch", "1,,2", 1, 64, "E")


def test_check_job_refuses_absurd_memory_and_length():
    check_job(1000, 64, 1000, 1000, {"L": 128, "P": 4, "D": 8})
    steps = MAX_NOISE_BYTES // (8 * 64 * 128) + 1
    with pytest.raises(OptionError, match=r"GiB of noise \(float64 \[T, B, L\]\), above the limit of 4 GiB"):
        check_job(64, 64, steps, None, {"L": 128})
    with pytest.raises(OptionError, match=r"samples of 65536 tokens take 40.0 GiB in memory"):
        check_job(81920, 1, 1, None, {"L": 65536})
    with pytest.raises(OptionError, match=r"take 1,000,000,000,000 graph calls, above the limit"):
        check_job(10_000_000, 1, 100_000, None, {"L": 16})


# ----------------------------------------------------------------------------- lddm-export

SAMPLE = ["sample", "--bundle", "b", "--steps", "2", "--num", "2", "--out", "s.npy"]
EXPORT_CASES = [
    (SAMPLE + ["--steps", "1000000000"], "--steps 1000000000 is above the limit of 100000"),
    (SAMPLE + ["--seed", "-1"], "--seed must be a non-negative integer, got -1; pass an integer from 0 to 4294967295"),
    (SAMPLE + ["--num", "x"], "--num must be an integer, got 'x'"),
    (SAMPLE + ["--latent-steps", "0"], "--latent-steps must be a positive integer, got 0"),
    (SAMPLE + ["--batch-size", "100000"], "--batch-size 100000 is above the limit of 65536"),
    (SAMPLE + ["--threads", "0"], "--threads must be a positive integer, got 0"),
    (["bench", "--bundle", "b", "--steps", "x"], "--steps must be an integer, got 'x'"),
    (["bench", "--bundle", "b", "--repeat", "0"], "--repeat must be a positive integer, got 0"),
    (["bench", "--bundle", "b", "--batch", "1,x"], "--batch '1,x' must be positive integers separated by commas"),
    (["bench", "--bundle", "b", "--batch", "1,100000"], "'100000' is not an integer from 1 to 65536"),
    (["verify", "--bundle", "b", "--ckpt", "c", "--samples", "15"], "--samples must be an integer >= 16, got 15"),
    (["verify", "--bundle", "b", "--ckpt", "c", "--seed", "-1"], "--seed must be a non-negative integer"),
    (["build", "--ckpt", "c", "--batch", "1,8,x"],
     "--batch '1,8,x' must be three positive integers MIN,OPT,MAX up to 65536, e.g. 1,8,64; 'x' is not an integer"),
    (["build", "--ckpt", "c", "--batch", "1,8"], "--batch '1,8' must be three positive integers"),
    (["build", "--ckpt", "c", "--batch", "0,8,9"], "'0' is not an integer from 1 to 65536"),
    (["build", "--ckpt", "c", "--opset", "x"], "--opset must be an integer, got 'x'"),
    (["build", "--ckpt", "c", "--workspace-mb", "0"], "--workspace-mb must be a positive integer, got 0"),
    (["build", "--ckpt", "c", "--max-model-gib", "nan"], "--max-model-gib nan must be a positive number of GiB"),
    (["sample", "--stepz", "2"], "No such option '--stepz'"),
    (["serve", "--bundle", "b", "--port", "80"], "--port must be an integer >= 1024, got 80"),
    (["serve", "--bundle", "b", "--port", "65535"], "--port 65535 is above the limit of 65534"),
    (["serve", "--bundle", "b", "--max-samples", "0"], "--max-samples must be a positive integer, got 0"),
    (["serve", "--bundle", "b", "--queue-delay-ms", "-1"], "--queue-delay-ms must be a non-negative integer"),
    (["serve", "--bundle", "b", "--model-name", "a/b"], "--model-name 'a/b' is not a model name"),
    (["serve", "--bundle", "b", "--backend", "tpu"], "backend 'tpu' is unknown"),
    (["serve", "--bundle", "b"], "bundle b is not a directory"),
    (["triton-repo", "--bundle", "b", "--out", "r", "--instances", "0"], "--instances must be a positive integer"),
    (["triton-repo", "--bundle", "b", "--out", "r", "--precision", "fp8"], "precision 'fp8' is unknown"),
    (["triton-repo", "--bundle", "b", "--out", "r"], "bundle b is not a directory"),
]


@pytest.mark.parametrize("argv,expected", EXPORT_CASES, ids=[" ".join(a[-2:]) for a, _ in EXPORT_CASES])
def test_lddm_export_numbers_are_one_sentence(argv, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, line = run(export_main, argv, capsys)
    assert code == 1 and line.startswith("lddm-export: error: ") and expected in line, line
    assert list(tmp_path.iterdir()) == []


def test_sample_refuses_an_absurdly_long_job_before_it_starts(mdlm_bundle, tmp_path, capsys):
    code, line = run(export_main, ["sample", "--bundle", str(mdlm_bundle), "--steps", "100000", "--num", "10000000",
                                   "--batch-size", "1", "--out", str(tmp_path / "s.npy")], capsys)
    assert code == 1 and "graph calls, above the limit of 100,000,000; lower --steps or --num" in line
    assert list(tmp_path.iterdir()) == []


def test_help_states_the_ranges(capsys):
    export_main(["sample", "--help"])
    assert "--steps 1..100000" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        train_main(["--help"])
    assert "[1..65536]" in capsys.readouterr().out


# ----------------------------------------------------------------------------- lddm-train

TRAIN = ["--variant", "mdlm", "--max-steps", "2", "--preset", "tiny", "--seq-len", "8", "--batch-size", "2",
         "--eval-batches", "1", "--no-progress", "--threads", "1"]
TRAIN_CASES = [
    (["--seq-len", "0"], "--seq-len must be a positive integer, got 0; pass an integer from 1 to 65536"),
    (["--seq-len", "x"], "--seq-len must be an integer, got 'x'"),
    (["--seq-len", "100000"], "--seq-len 100000 is above the limit of 65536"),
    (["--seed", "-1"], "--seed must be a non-negative integer, got -1"),
    (["--max-steps", "0"], "--max-steps must be a positive integer, got 0"),
    (["--threads", "-1"], "--threads must be a non-negative integer, got -1"),
    (["--batch-size", "65536", "--seq-len", "65536"], "tokens a batch, above the limit of 16,777,216"),
    (["--width", "16384", "--depth", "64", "--heads", "64"], "GiB of weights, above the limit of 4 GiB"),
    (["--max-model-gib", "0"], "--max-model-gib 0.0 must be a positive number of GiB"),
]


@pytest.mark.parametrize("flags,expected", TRAIN_CASES, ids=[" ".join(f) for f, _ in TRAIN_CASES])
def test_lddm_train_numbers_are_one_sentence_and_exit_2(flags, expected, tmp_path, capsys):
    code, line = run(train_main, [*TRAIN, *flags, "--out", str(tmp_path / "m.pt")], capsys)
    assert code == 2 and line.startswith("lddm-train: error: ") and expected in line, line
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- a directory as a file

@pytest.mark.parametrize("argv", [
    ["build", "--ckpt", "{dir}", "--out", "{tmp}/out"],
    ["sample", "--bundle", "{bundle}", "--steps", "2", "--num", "2", "--backend", "torch", "--ckpt", "{dir}",
     "--out", "{tmp}/s.npy"],
    ["verify", "--bundle", "{bundle}", "--ckpt", "{dir}"],
])
def test_a_directory_passed_as_a_checkpoint_is_called_a_directory(argv, mdlm_bundle, tmp_path, capsys):
    (tmp_path / "model.pt").mkdir()
    argv = [a.format(dir=tmp_path / "model.pt", tmp=tmp_path, bundle=mdlm_bundle) for a in argv]
    code, line = run(export_main, argv, capsys)
    assert code == 1 and f"--ckpt {tmp_path / 'model.pt'} is a directory, not a file" in line
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_a_directory_passed_to_resume_is_called_a_directory(tmp_path, capsys):
    (tmp_path / "old").mkdir()
    code, line = run(train_main, [*TRAIN, "--out", str(tmp_path / "m.pt"), "--resume", str(tmp_path / "old")], capsys)
    assert code == 2 and f"--resume {tmp_path / 'old'} is a directory, not a file" in line


# ----------------------------------------------------------------------------- interrupts

def interrupt_at(monkeypatch, call: int, how: str = "sigint") -> None:
    """Make the `call`-th training step raise Ctrl-C (or send this process SIGTERM)."""
    real, calls = trainer.compute_loss, []

    def compute_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            if how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "compute_loss", compute_loss)


def test_ctrl_c_before_the_first_evaluation_says_there_is_no_resume_file(tmp_path, capsys, monkeypatch):
    interrupt_at(monkeypatch, 2)
    code, line = run(train_main, [*TRAIN, "--max-steps", "8", "--eval-every", "4", "--out", str(tmp_path / "m.pt")],
                     capsys)
    assert code == 130
    assert line == ("lddm-train: interrupted at step 1, before the first evaluation (step 4); this run wrote no "
                    "resume file, so it has to start again")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("how", ["sigint", "sigterm"])
def test_an_interrupt_after_an_evaluation_names_the_resume_file(how, tmp_path, capsys, monkeypatch):
    interrupt_at(monkeypatch, 4, how)  # calls 1, 2: steps 1 and 2; call 3: the evaluation at step 2
    code, line = run(train_main, [*TRAIN, "--max-steps", "8", "--eval-every", "2", "--out", str(tmp_path / "m.pt")],
                     capsys)
    resume = tmp_path / "m.pt.resume.pt"
    assert code == 130
    assert line == f"lddm-train: interrupted at step 2; the resume file {resume} holds step 2: continue with --resume {resume}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt.resume.pt"]
    assert torch.load(resume, weights_only=True)["step"] == 2


# ----------------------------------------------------------------------------- tokenizer

def test_a_malformed_tokenizer_entry_is_refused_at_build_time(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "model.pt", "mdlm")
    raw = torch.load(ckpt, weights_only=True)
    raw["tokenizer"] = {"kind": "bpe", "json": "{not json", "vocab_size": raw["config"]["vocab_size"]}
    torch.save(raw, ckpt)
    code, line = run(export_main, ["build", "--ckpt", str(ckpt), "--out", str(tmp_path / "out"), "--engines", "off"],
                     capsys)
    assert code == 1 and f"checkpoint {ckpt}" in line and "tokenizer" in line
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
