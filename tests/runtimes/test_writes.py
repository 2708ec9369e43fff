"""Every file the tools write goes through runtimes.fileio.write_atomic: a temporary file beside
the target, fsync, rename. A full disk, a directory in the way or a missing parent directory is
one sentence and leaves nothing behind; a target that is not a regular file is refused; files
get the ordinary mode under the umask."""
from __future__ import annotations

import errno
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from fixtures import cached_tiny_bundle
from lddm_export.cli import main as export_main
from lddm_export.commands.sample import write_samples
from lddm_export.manifest import write_manifest
from runtimes import fileio
from runtimes.fileio import WriteError, check_target, write_atomic, write_json
from training.checkpoint import save_checkpoint
from training.cli import main as train_main
from training.config import ModelConfig
from training.model import LDDM
from training.trainer import save_resume

TINY = ModelConfig(variant="mdlm", seq_len=8, width=32, heads=2, depth=1)

# Every file writer of the tools except the manifest (below), as name -> (file name, write(path)).
WRITERS = {
    "write_json (bench --json, verify --json, parity.json)": ("r.json", lambda p: write_json(p, {"a": 1}, "--json")),
    "sample --out .npy": ("s.npy", lambda p: write_samples(p, np.zeros((2, 3), np.int64), [])),
    "sample --out .jsonl": ("s.jsonl", lambda p: write_samples(p, np.zeros((2, 3), np.int64), [None, None])),
    "lddm-train --out (save_checkpoint)": ("m.pt", lambda p: save_checkpoint(p, LDDM(TINY), None, {})),
    "lddm-train resume file": ("m.pt.resume.pt", lambda p: save_resume(p, {"step": 1})),
}


def write(writer: str, directory: Path) -> Path:
    name, fn = WRITERS[writer]
    fn(directory / name)
    return directory / name


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


class FullDisk:
    """A file whose write() fails with ENOSPC after `room` bytes, like a disk that fills up."""

    def __init__(self, f, room: int = 10):
        self.f, self.room = f, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.fixture(scope="module")
def mdlm_bundle(bundle_cache) -> Path:  # noqa: F811
    """Built before full_disk is in force (module fixtures are set up first)."""
    return cached_tiny_bundle(bundle_cache, "mdlm")


@pytest.fixture
def full_disk(monkeypatch):
    real = os.fdopen
    monkeypatch.setattr(fileio.os, "fdopen", lambda fd, mode="r": FullDisk(real(fd, mode)))


# ----------------------------------------------------------------------------- the helper

def test_write_atomic_writes_with_the_umask_mode_and_leaves_nothing(tmp_path):
    old = os.umask(0o027)
    try:
        write_atomic(tmp_path / "f.bin", lambda f: f.write(b"data"), "--out")
    finally:
        os.umask(old)
    assert (tmp_path / "f.bin").read_bytes() == b"data"
    assert stat.S_IMODE((tmp_path / "f.bin").stat().st_mode) == 0o640 and leftovers(tmp_path) == []


def test_a_failing_writer_leaves_the_old_file(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"old")

    def interrupted(f):
        f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(tmp_path / "f.bin", interrupted, "--out")
    assert (tmp_path / "f.bin").read_bytes() == b"old" and leftovers(tmp_path) == []


def test_a_device_is_refused(tmp_path):
    with pytest.raises(WriteError, match=r"--json /dev/null exists and is a device, not a regular file"):
        check_target("/dev/null", "--json")


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _symlink(path: Path) -> None:
    path.symlink_to(path.with_name("elsewhere"))


# ----------------------------------------------------------------------------- every writer

@pytest.mark.parametrize("writer", WRITERS)
def test_every_writer_is_atomic_with_the_ordinary_mode(writer, tmp_path):
    old = os.umask(0o022)
    try:
        path = write(writer, tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 and leftovers(tmp_path) == []


@pytest.mark.parametrize("writer", WRITERS)
def test_every_writer_survives_a_full_disk(writer, tmp_path, full_disk):
    path = tmp_path / WRITERS[writer][0]
    path.write_bytes(b"old")
    with pytest.raises(WriteError, match=r"No space left on device\), so nothing was written; free some space"):
        write(writer, tmp_path)
    assert path.read_bytes() == b"old" and leftovers(tmp_path) == []


@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("in_the_way,expected", [
    (lambda p: p.mkdir(), "exists and is a directory, not a regular file"),
    (_symlink, "exists and is a symbolic link, not a regular file"),
    (_fifo, "exists and is a FIFO, not a regular file"),
])
def test_every_writer_refuses_a_target_that_is_not_a_regular_file(writer, in_the_way, expected, tmp_path):
    path = tmp_path / WRITERS[writer][0]
    in_the_way(path)
    with pytest.raises(WriteError, match=expected):
        write(writer, tmp_path)
    assert not path.is_file() and leftovers(tmp_path) == []


@pytest.mark.parametrize("writer", WRITERS)
def test_every_writer_refuses_a_missing_or_blocked_parent(writer, tmp_path):
    with pytest.raises(WriteError, match=r"the directory \S+missing does not exist; create it first"):
        write(writer, tmp_path / "missing")
    (tmp_path / "file").write_text("")
    with pytest.raises(WriteError, match=r"file is a file, not a directory"):
        write(writer, tmp_path / "file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_the_manifest_of_a_new_bundle_survives_a_full_disk(tmp_path, mdlm_bundle, full_disk):
    manifest = json.loads((mdlm_bundle / "manifest.json").read_text())
    bundle = tmp_path / "bundle"
    shutil.copytree(mdlm_bundle / "onnx", bundle / "onnx")
    with pytest.raises(WriteError, match="cannot write the manifest"):
        write_manifest(bundle, manifest)
    assert sorted(p.name for p in bundle.iterdir()) == ["onnx"]


# ----------------------------------------------------------------------------- through the commands

def run(main, argv) -> tuple[int, str]:
    try:
        main(argv)
        return 0, ""
    except SystemExit as e:
        return e.code, ""


def one_sentence(capsys, prefix: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_sample_on_a_full_disk_is_one_sentence(tmp_path, capsys, mdlm_bundle, full_disk):
    out = tmp_path / "s.npy"
    code, _ = run(export_main, ["sample", "--bundle", str(mdlm_bundle), "--steps", "2",
                                "--num", "2", "--out", str(out)])
    assert code == 1 and "cannot write --out" in one_sentence(capsys, "lddm-export: error:")
    assert leftovers(tmp_path) == [] and not out.exists()


@pytest.mark.parametrize("command", ["bench", "verify"])
def test_json_reports_are_checked_before_any_work(command, tmp_path, capsys, mdlm_bundle):
    bundle = mdlm_bundle
    (tmp_path / "report.json").mkdir()
    extra = ["--ckpt", str(bundle / "model.pt")] if command == "verify" else []
    for json_path, expected in ((tmp_path / "report.json", "exists and is a directory"),
                                (tmp_path / "missing" / "r.json", "does not exist; create it first")):
        code, _ = run(export_main, [command, "--bundle", str(bundle), *extra, "--json", str(json_path)])
        assert code == 1 and expected in one_sentence(capsys, "lddm-export: error: --json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


TRAIN = ["--variant", "mdlm", "--max-steps", "2", "--preset", "tiny", "--seq-len", "8", "--batch-size", "2",
         "--eval-every", "1", "--eval-batches", "1", "--no-progress", "--threads", "1"]


def test_lddm_train_on_a_full_disk_exits_1_and_leaves_nothing(tmp_path, capsys, full_disk):
    code, _ = run(train_main, [*TRAIN, "--out", str(tmp_path / "m.pt")])
    assert code == 1 and "nothing was written" in one_sentence(capsys, "lddm-train: error:")
    assert list(tmp_path.iterdir()) == []


def test_lddm_train_refuses_an_unwritable_out_before_training(tmp_path, capsys):
    code, _ = run(train_main, [*TRAIN, "--out", str(tmp_path / "missing" / "m.pt")])
    assert code == 2 and "does not exist; create it first or choose another --out" in one_sentence(
        capsys, "lddm-train: error:")
    (tmp_path / "m.pt.resume.pt").mkdir()  # a directory where the resume file goes
    code, _ = run(train_main, [*TRAIN, "--out", str(tmp_path / "m.pt")])
    assert code == 2 and "the resume file of --out" in one_sentence(capsys, "lddm-train: error:")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt.resume.pt"]


def test_a_checkpoint_written_through_a_file_object_loads(tmp_path):
    save_checkpoint(tmp_path / "m.pt", LDDM(TINY), None, {"steps": 0})
    assert torch.load(tmp_path / "m.pt", weights_only=True)["config"]["seq_len"] == 8
