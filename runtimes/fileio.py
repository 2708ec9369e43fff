"""Files the tools write and read: the one atomic write, and the checks before either.

    check_target(path, what)         the refusals of a write, up front (before any time is spent)
    write_atomic(path, write, what)  write(f) into a temporary file beside `path`, fsync, rename
    write_json(path, data, what)     the same for a JSON document
    check_input_file(path, what, fix)  a file to read: "does not exist" or "is a directory"
    sha256_file(path)                the hex sha256 of a file (checkpoints, bundle files)

A write either replaces `path` with the complete new file or leaves it, and its directory, as
they were: the data goes to a temporary file in the same directory (mkstemp), is flushed and
fsynced, and is renamed over `path`; on any failure, Ctrl-C included, the temporary file is
removed. The new file gets the ordinary mode, 0666 & ~umask (mkstemp creates 0600).

Refused with one sentence (WriteError), before anything is written:
  - a parent directory that is missing, or a file where the parent directory should be;
  - a target that exists and is not a regular file (a directory, a symbolic link, a device such
    as /dev/null, a FIFO, a socket): renaming over it would replace it with a regular file;
  - a directory that cannot be written (probed by creating and removing a temporary file).
A write that fails part way (a full disk, ENOSPC) is one sentence too, and leaves nothing.

Pure Python: training/ and the Jetson-side tools use it without torch.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from runtimes.errors import LddmError


class WriteError(LddmError):
    """An output file cannot be written; the message names it and the fix."""


def file_kind(mode: int) -> str:
    """What an lstat() mode is, for a message: "a directory", "a symbolic link", ..."""
    kinds = [(stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"),
             (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device"), (stat.S_ISFIFO, "a FIFO"),
             (stat.S_ISSOCK, "a socket")]
    return next((kind for test, kind in kinds if test(mode)), "a special file")


def check_target(path: str | Path, what: str) -> Path:
    """Refuse a write to `path` that could not succeed, before any work is done.

    Args:
        path: the file to be written.
        what: how the user named it, for the message: "--out", "--json", "the resume file".
    Returns:
        path as a Path.
    Raises:
        WriteError: one sentence naming `what`, the path and the fix.
    """
    path, another = Path(path), _another(what)
    parent = path.parent
    if not parent.exists():
        raise WriteError(f"{what} {path}: the directory {parent} does not exist; create it first or {another}")
    if not parent.is_dir():
        raise WriteError(f"{what} {path}: {parent} is a file, not a directory; {another}")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        raise WriteError(f"{what} {path} exists and is {file_kind(mode)}, not a regular file, and would be "
                         f"replaced; {another}")
    try:  # a real probe: os.access says yes to root on read-only mounts
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise WriteError(f"{what} {path}: the directory {parent} is not writable ({e.strerror}); {another}") from None
    return path


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None], what: str) -> None:
    """Write a file through a temporary file in the same directory, fsync and rename.

    Args:
        path: the file to create or replace.
        write: called once with the temporary file, opened for binary writing.
        what: how the user named the file, for messages ("--out", "--json", ...).
    Raises:
        WriteError: a refusal of check_target, or an OSError while writing (a full disk); the
            temporary file is removed and `path` is as it was.
    """
    path = check_target(path, what)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        fsync_directory(path.parent)
    except OSError as e:
        raise WriteError(f"cannot write {what} {path} ({e.strerror or e}), so nothing was written; free "
                         f"some space or {_another(what)}") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def write_json(path: str | Path, data, what: str) -> None:
    """write_atomic of `data` as indented JSON with a final newline."""
    text = json.dumps(data, indent=2) + "\n"
    write_atomic(path, lambda f: f.write(text.encode()), what)


def fsync_directory(path: str | Path) -> None:
    """Make a rename inside the directory durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_input_file(path: str | Path, what: str, fix: str, error: type[Exception] = LddmError) -> Path:
    """Refuse an input file that is missing, a directory or not a regular file, each in its words.

    Args:
        path: the file to be read; what: how the user named it ("--ckpt"); fix: what to pass instead.
        error: the exception class to raise (lddm-train raises its argument errors).
    Raises:
        error: "{what} {path} does not exist; {fix}", "... is a directory, not a file; {fix}", ...
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist; {fix}") from None
    except OSError as e:
        raise error(f"{what} {path} cannot be read ({e.strerror}); {fix}") from None
    if not stat.S_ISREG(mode):
        raise error(f"{what} {path} is {file_kind(mode)}, not a file; {fix}")
    return path


def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _another(what: str) -> str:
    """The fix for a path the user cannot write: "choose another --out", or another path."""
    return f"choose another {what}" if what.startswith("--") else "choose another path"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
