"""Faults during a build's commit (lddm_export/commit.py): kill -9 at seeded random moments of a
real build over an existing bundle, kill -9 at each step of the swap, two builds racing into one
--out, SIGTERM, and --force next to the checkpoint or the current directory.

The invariant: --out always holds a complete bundle (the old or the new one, every file matching
its hash), and the next build leaves nothing beside it."""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fixtures import tiny_checkpoint
from lddm_export import commit
from lddm_export.build import build_bundle, parse_options
from lddm_export.cli import main
from runtimes.bundle import Bundle, sha256_file

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--engines", "off", "--precision", "fp32", "--no-calibrate"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def ckpts(work) -> tuple[Path, Path]:
    return tiny_checkpoint(work / "a.pt", "mdlm", seed=0), tiny_checkpoint(work / "b.pt", "mdlm", seed=1)


@pytest.fixture(scope="module")
def built_a(work, ckpts) -> Path:
    """The bundle of checkpoint a, built once; tests copy it."""
    return build_bundle(ckpts[0], work / "template-a", parse_options(precision="fp32", engines="off", calibrate=False),
                        log=lambda line: None)


def existing_bundle(built_a: Path, parent: Path) -> Path:
    out = parent / "out"
    shutil.copytree(built_a, out)
    return out


def beside(out: Path) -> list[str]:
    """Everything a build may leave beside --out: temporary, old and lock files."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def complete_bundle_of(out: Path, ckpts) -> Path:
    """Assert `out` is a complete bundle (hashes checked) of one of the checkpoints; return that one."""
    sha = Bundle.open(out).manifest["checkpoint"]["sha256"]
    matches = [c for c in ckpts if sha256_file(c) == sha]
    assert matches, f"{out} holds a bundle of neither checkpoint"
    return matches[0]


def cli_build(ckpt: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lddm_export.cli", "build", "--ckpt", str(ckpt), "--out", str(out),
                             *FAST, *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.err


# ----------------------------------------------------------------------------- kill -9

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill_9_at_a_random_moment_leaves_a_complete_bundle(seed, built_a, ckpts, tmp_path):
    out = existing_bundle(built_a, tmp_path)
    process = cli_build(ckpts[1], out, "--force")
    try:
        deadline = time.monotonic() + 120
        while not any(".tmp-" in name for name in beside(out)) and process.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(random.Random(seed).uniform(0.0, 3.0))  # somewhere in export, manifest, swap or cleanup
    finally:
        process.kill()
        process.communicate()
    held = complete_bundle_of(out, ckpts)

    lines = []  # the next build (of what --out holds: no export) removes what the killed one left
    build_bundle(held, out, parse_options(precision="fp32", engines="off", calibrate=False), log=lines.append)
    assert complete_bundle_of(out, ckpts) == held and beside(out) == []
    assert any("[export] skipped" in line for line in lines)


CHILD = r"""
import os, signal, sys
from pathlib import Path
from lddm_export import commit

out, point = Path(sys.argv[1]), sys.argv[2]

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

def fill(tmp):
    for i in range(20):
        (tmp / f"f{i}").write_text("new")
    if point == "writing":
        die()

if point == "swapped":          # after the exchange, before the old bundle is deleted
    swap = commit.exchange
    commit.exchange = lambda a, b: swap(a, b) and die()
elif point == "deleting-old":   # part of the old bundle deleted
    def rmtree(path):
        next(Path(path).iterdir()).unlink()
        die()
    commit.shutil.rmtree = rmtree
elif point == "between-renames":  # the fallback: out moved aside, the new one not yet in place
    commit.exchange = lambda a, b: False
    rename = os.rename
    def rename_then_die(a, b):
        rename(a, b)
        die()
    commit.os.rename = rename_then_die
with commit.exclusive(out, print):
    commit.replace_directory(out, fill)
"""


def contents(out: Path) -> set[str]:
    """The one value every file of the directory holds; a mixed or partial directory fails."""
    files = sorted(out.iterdir())
    assert [p.name for p in files] == sorted(f"f{i}" for i in range(20)), "a partial directory"
    values = {p.read_text() for p in files}
    assert len(values) == 1, "a mix of old and new files"
    return values


@pytest.mark.parametrize("point", ["writing", "swapped", "deleting-old", "between-renames"])
def test_kill_9_at_each_step_of_the_swap(point, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for i in range(20):
        (out / f"f{i}").write_text("old")
    result = subprocess.run([sys.executable, "-c", CHILD, str(out), point], cwd=ROOT, capture_output=True, timeout=600)
    assert result.returncode == -signal.SIGKILL, result.stderr
    if point == "between-renames":  # the documented window of the fallback: no --out until the next build
        assert not out.exists()
    else:
        assert contents(out) == ({"old"} if point == "writing" else {"new"})
    with commit.exclusive(out, log=lambda line: None):  # the next build: restore and clean up first
        assert contents(out) == ({"new"} if point in ("swapped", "deleting-old") else {"old"})
        assert [name for name in beside(out) if not name.endswith(".lock")] == []
    assert beside(out) == []


def test_a_reader_never_sees_out_missing_during_swaps(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("0")
    missing, stop = [], threading.Event()

    def read():
        while not stop.is_set():
            if not (out / "manifest.json").exists():
                missing.append(time.monotonic())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        with commit.exclusive(out, log=lambda line: None):
            for i in range(50):
                commit.replace_directory(out, lambda tmp: (tmp / "manifest.json").write_text(str(i)))
    finally:
        stop.set()
        reader.join()
    assert missing == [] and (out / "manifest.json").read_text() == "49" and beside(out) == []


# ----------------------------------------------------------------------------- concurrency

def test_a_second_build_into_a_locked_out_is_refused(built_a, ckpts, tmp_path, capsys):
    out = existing_bundle(built_a, tmp_path)
    with commit.exclusive(out, log=lambda line: None):  # a build in progress
        code, err = run_main(["build", "--ckpt", str(ckpts[1]), "--out", str(out), *FAST, "--force"], capsys)
    assert code == 1 and "Traceback" not in err
    assert f"another build is writing --out {out} (process {os.getpid()} holds" in err
    assert complete_bundle_of(out, ckpts) == ckpts[0] and beside(out) == []


def test_two_builds_racing_into_one_out(built_a, ckpts, tmp_path):
    out = existing_bundle(built_a, tmp_path)
    racers = [cli_build(ckpt, out, "--force") for ckpt in ckpts]
    try:
        results = [(p.wait(timeout=600), p.communicate()[1]) for p in racers]
    finally:
        for p in racers:
            p.kill()
    assert any(code == 0 for code, _ in results), results
    for code, err in results:
        assert code == 0 or (code == 1 and "another build is writing --out" in err), err
        assert "Traceback" not in err
    complete_bundle_of(out, ckpts)
    assert beside(out) == []


# ----------------------------------------------------------------------------- signals, --force

def test_sigterm_mid_build_is_an_interrupt(built_a, ckpts, tmp_path, capsys, monkeypatch):
    out = existing_bundle(built_a, tmp_path)
    monkeypatch.setattr("lddm_export.export.export_graph", lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGTERM))
    code, err = run_main(["build", "--ckpt", str(ckpts[1]), "--out", str(out), *FAST, "--force"], capsys)
    assert code == 130 and "interrupted; nothing was left half-written" in err
    assert complete_bundle_of(out, ckpts) == ckpts[0] and beside(out) == []
    assert signal.getsignal(signal.SIGTERM) is not signal.default_int_handler  # main() restored it


@pytest.mark.parametrize("out,cwd,inside", [
    ("home/models", ".", True),      # the checkpoint's directory
    ("home", ".", True),             # a parent of it
    (".", "home/models", False),     # the current directory
    ("..", "home/models", False),    # a parent of it
])
def test_force_never_deletes_the_checkpoint_or_the_current_directory(out, cwd, inside, ckpts, tmp_path, capsys,
                                                                       monkeypatch):
    (tmp_path / "home" / "models").mkdir(parents=True)
    ckpt = Path(shutil.copy(ckpts[0], tmp_path / "home" / "models" / "model.pt")) if inside else ckpts[0]
    monkeypatch.chdir(tmp_path / cwd)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, err = run_main(["build", "--ckpt", str(ckpt), "--out", out, *FAST, "--force"], capsys)
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert ("holds the checkpoint being built" if inside else "is or holds the current directory") in err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_a_rebuild_never_copies_a_symlinks_target_into_the_bundle(built_a, ckpts, tmp_path, capsys):
    out = existing_bundle(built_a, tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the bundle")
    (out / "notes.txt").symlink_to(secret)
    code, err = run_main(["build", "--ckpt", str(ckpts[0]), "--out", str(out), *FAST], capsys)
    assert code == 1 and "Traceback" not in err and "pass --force to replace it" in err
    assert (out / "notes.txt").is_symlink() and beside(out) == []
    assert not any(p.read_bytes() == secret.read_bytes() for p in out.rglob("*") if p.is_file() and not p.is_symlink())
