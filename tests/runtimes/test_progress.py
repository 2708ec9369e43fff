"""runtimes/progress.py, and what lddm-train shows with it: plain, sparse lines when the output is
not a terminal, a bar when it is, and only the fields a variant has."""
from __future__ import annotations

import io

import pytest

from runtimes.progress import progress
from training.cli import main as train_main


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_every_tenth_and_the_end_once():
    stream = io.StringIO()
    with progress(25, "job", unit="call", stream=stream) as bar:
        for n in range(25):
            bar.set_postfix(n=n)
            bar.update(1)
    lines = stream.getvalue().splitlines()
    tenths = (3, 5, 8, 10, 13, 15, 18, 20, 23, 25)
    assert [line.split(" (")[0] for line in lines] == [f"job: {n}/25 calls" for n in tenths]
    assert lines[-1].startswith("job: 25/25 calls (100%), ") and lines[-1].endswith(" s, n 24")
    assert "\r" not in stream.getvalue()


def test_plain_lines_end_with_the_count_reached_and_say_nothing_after_a_failure():
    stream = io.StringIO()
    with progress(100, "job", stream=stream) as bar:
        bar.update(4)  # below the first tenth: no line until the end
    assert stream.getvalue().startswith("job: 4/100 steps (4%), ") and len(stream.getvalue().splitlines()) == 1
    stream = io.StringIO()
    with pytest.raises(KeyboardInterrupt), progress(100, "job", stream=stream) as bar:
        bar.update(4)
        raise KeyboardInterrupt
    assert stream.getvalue() == ""


def test_a_resumed_job_does_not_repeat_the_tenths_it_passed():
    stream = io.StringIO()
    with progress(10, "job", initial=5, stream=stream) as bar:
        bar.update(1)
    assert stream.getvalue().startswith("job: 6/10 steps (60%), ") and len(stream.getvalue().splitlines()) == 1


def test_a_terminal_gets_a_bar_that_leaves_no_trace_and_write_goes_to_stdout(capsys):
    stream = Terminal()
    with progress(4, "job", stream=stream) as bar:
        bar.update(2)
        bar.write("a line")
    assert stream.getvalue().startswith("\rjob:   0%|") and "0/4 [" in stream.getvalue()  # tqdm's bar
    assert stream.getvalue().endswith("\r")  # closed: the bar's line is cleared
    assert capsys.readouterr().out == "a line\n"


def test_disabled_shows_nothing_but_written_lines(capsys):
    stream = io.StringIO()
    with progress(4, "job", enabled=False, stream=stream) as bar:
        bar.update(4)
        bar.write("a line")
    assert stream.getvalue() == "" and capsys.readouterr().out == "a line\n"


# ----------------------------------------------------------------------------- lddm-train

TRAIN = ["--max-steps", "4", "--preset", "tiny", "--seq-len", "8", "--n-latent", "2", "--latent-dim", "4",
         "--batch-size", "2", "--eval-every", "2", "--eval-batches", "1", "--threads", "1"]


@pytest.mark.parametrize("variant,fields", [("mdlm", ["loss_x"]), ("ar", ["loss_x"]),
                                            ("seq", ["stage", "loss_x", "loss_y"])])
def test_lddm_train_progress_shows_the_variants_fields_once_at_the_end(variant, fields, tmp_path, capsys):
    train_main(["--variant", variant, *TRAIN, "--out", str(tmp_path / "m.pt")])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith(f"train {variant}: ")]
    assert [line.split(" (")[0] for line in lines] == [f"train {variant}: {n}/4 steps" for n in (1, 2, 3, 4)]
    shown = [part.split()[0] for part in lines[-1].split(", ")[2:]]
    assert shown == fields
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("step ")] == ["step 2", "step 4"]


def test_lddm_train_help_gives_every_option_a_text_and_its_default(capsys):
    with pytest.raises(SystemExit) as info:
        train_main(["--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--variant {mdlm,fuji,seq,ar} mdlm: masked diffusion", "--max-steps N optimiser steps",
                   "[1..1000000000] (required)", "--lr X AdamW learning rate after --warmup (default: 0.001)",
                   "--mask-schedule {linear,loglinear} masking schedule of the tokens (default: loglinear)",
                   "--latent-layout {slots,chunks} slots:",
                   "--seq-len N L, tokens per sequence [1..65536] (default: 128)",
                   "--width N model width (default: the preset's) [1..65536]",
                   "--seed N seed of the initial weights and of every training draw [0..4294967295] (default: 0)"):
        assert option in text, option
    assert "(default: None)" not in text and "(default: False)" not in text
