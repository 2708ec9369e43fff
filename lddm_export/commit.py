"""A build's commit: one build per --out at a time, and --out always a complete bundle.

    with exclusive(out, log):        # the lock; leftovers of killed builds cleaned up
        replace_directory(out, fill) # fill(tmp) writes a fresh directory, which then replaces out

The lock. `fcntl.flock` on `.NAME.lock` beside `out`, taken without waiting: a second build into
the same --out is refused with one sentence while the first runs. The kernel drops a lock when
its process dies, kill -9 included, so a killed build never blocks the next one. The build that
holds the lock removes the file, and an opener re-checks after locking that the file it locked
is still the one at that path.

The swap. The new bundle is written into `.NAME.tmp-PID-HEX` beside `out`. An existing `out` is
swapped with it by one renameat2(RENAME_EXCHANGE) (Linux >= 3.15 with glibc >= 2.28, on ext4,
xfs, btrfs, tmpfs and most local filesystems), so at every instant `out` is the complete old
bundle or the complete new one. The old bundle, now under the temporary name, is then deleted.

The fallback, where RENAME_EXCHANGE is missing (another OS, an older glibc, a filesystem that
answers EINVAL, such as some network filesystems): two renames, `out` -> `.NAME.old-PID-HEX`,
then the new one -> `out`. A kill between the two leaves no `out` for that moment; the next
build into the same --out renames the old bundle back before it does anything else.

Leftovers. Directories `.NAME.tmp-*` and `.NAME.old-*` of killed builds are deleted by the next
build into the same --out, under the lock.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from runtimes.errors import BundleError
from runtimes.fileio import fsync_directory

AT_FDCWD = -100
RENAME_EXCHANGE = 2  # linux/fs.h


# ----------------------------------------------------------------------------- the lock

@contextmanager
def exclusive(out: Path, log: Callable[[str], None], flag: str = "--out") -> Iterator[None]:
    """Hold the lock of `out` for the block, after removing the leftovers of killed builds.

    Args:
        out: the directory to be replaced; log: progress sink; flag: how the user named `out`.
    Raises:
        BundleError: another build holds the lock, no lock file can be created beside `out`, or
            `out` exists and is not a directory (a file is never replaced, --force or not).
    """
    lock = out.with_name(f".{out.name}.lock")
    fd = _acquire(lock, out, flag)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
        _clean_leftovers(out, log)
        if out.exists() and not out.is_dir():
            raise BundleError(f"{flag} {out} exists and is not a directory; choose another {flag}")
        yield
    finally:
        if _is_file_at(fd, lock):  # unlinked while still locked: an opener of the old file re-checks
            os.unlink(lock)
        os.close(fd)


def _acquire(lock: Path, out: Path, flag: str) -> int:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BundleError(f"cannot create the directory of {flag} {out} ({e.strerror}); "
                          f"choose a {flag} in a writable directory") from None
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise BundleError(f"cannot create the lock file {lock} beside {flag} {out} ({e.strerror}); "
                              f"choose a {flag} in a writable directory") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise BundleError(f"another build is writing {flag} {out} (process {holder or '?'} holds {lock}); "
                              f"wait for it to finish or choose another {flag}") from None
        if _is_file_at(fd, lock):
            os.ftruncate(fd, 0)
            return fd
        os.close(fd)  # the holder removed the file between our open and our lock: open it afresh


def _is_file_at(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


# ----------------------------------------------------------------------------- leftovers

def _leftovers(out: Path) -> list[Path]:
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-\d+-[0-9a-f]{{8}}")
    return sorted(p for p in out.parent.iterdir() if pattern.fullmatch(p.name))


def _clean_leftovers(out: Path, log: Callable[[str], None]) -> None:
    """Delete the temporary and old directories of killed builds; first, where a fallback swap
    was killed between its two renames (no `out`, an old bundle beside it), put the old one back."""
    stale = _leftovers(out)
    olds = [p for p in stale if ".old-" in p.name]
    if olds and not os.path.lexists(out):
        newest = max(olds, key=lambda p: p.stat().st_mtime)
        try:
            os.rename(newest, out)
        except OSError as e:
            raise BundleError(f"cannot restore {out} from {newest}, left by a build killed while replacing it "
                              f"({e.strerror}); rename it to {out} by hand") from None
        stale.remove(newest)
        log(f"[commit] {out} restored from {newest.name}, left by a build killed while replacing it")
    for path in stale:
        _discard(path)
    if stale:
        log(f"[commit] removed {len(stale)} directories left beside {out} by interrupted builds")


def _remove(path: Path) -> None:
    """Delete a file, a symbolic link (never its target) or a directory tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _discard(path: Path) -> None:
    """_remove, where a failure only leaves a leftover that the next build deletes."""
    try:
        _remove(path)
    except OSError:
        pass


# ----------------------------------------------------------------------------- the swap

def replace_directory(out: Path, fill: Callable[[Path], None], flag: str = "--out") -> None:
    """Run `fill(tmp)` in a fresh directory beside `out`, then put it in place of `out`.

    On any exception, KeyboardInterrupt included, the fresh directory is removed and `out` is
    as it was. Call it inside `exclusive(out, ...)`.

    Raises:
        BundleError: an OSError while writing the new bundle (a full disk) or putting it in place.
    """
    tmp = _sibling(out, "tmp", flag)
    try:
        fill(tmp)
    except OSError as e:
        _discard(tmp)
        raise BundleError(f"cannot write the new bundle beside {flag} {out} ({e.strerror}); the old one is "
                          f"unchanged; free some space or choose another {flag}") from None
    except BaseException:
        _discard(tmp)
        raise
    try:
        _fsync_tree(tmp)
        if not os.path.lexists(out):
            os.rename(tmp, out)
        elif not exchange(tmp, out):
            _two_renames(tmp, out)
        fsync_directory(out.parent)
    except OSError as e:
        raise BundleError(f"cannot put the new bundle in place of {flag} {out} ({e.strerror}); the old one is "
                          f"unchanged; check the permissions of {out.parent}") from None
    finally:
        _discard(tmp)  # the partial new bundle, or after the swap the old one


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step with renameat2(RENAME_EXCHANGE); False where that is unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _two_renames(tmp: Path, out: Path) -> None:
    """The fallback swap (module docstring): `out` is absent between the two renames."""
    old = _sibling_name(out, "old")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    _discard(old)


def _sibling_name(out: Path, kind: str) -> Path:
    return out.with_name(f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")


def _sibling(out: Path, kind: str, flag: str) -> Path:
    """Create an empty hidden directory beside `out` (mode from the umask, like `out` itself)."""
    path = _sibling_name(out, kind)
    try:
        path.mkdir()
    except OSError as e:
        raise BundleError(f"cannot create a directory beside {flag} {out} ({e.strerror}); "
                          f"choose a {flag} in a writable directory") from None
    return path


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory of the new bundle to disk before it is put in place."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_directory(dirpath)


def check_not_in_use(out: Path, source: Path | None = None, flag: str = "--out",
                     source_is: str = "the checkpoint being built") -> None:
    """Refuse to replace `out` when it is, or holds, the current directory or the input being
    read: replacing a directory deletes the old one with everything in it.

    Args:
        out: the directory a build would replace; source: the input being read, if any (the
            checkpoint of a build, the bundle of triton-repo), named by `source_is`;
        flag: how the user named `out`.
    Raises:
        BundleError: "--out X holds the checkpoint being built (Y), ...; choose another --out".
    """
    if not os.path.lexists(out):
        return
    target = out.resolve()

    def inside(path: Path) -> bool:
        resolved = path.resolve()
        return resolved == target or target in resolved.parents

    if source is not None and inside(source):
        raise BundleError(f"{flag} {out} holds {source_is} ({source}), and replacing {flag} deletes the old "
                          f"directory with everything in it; choose another {flag}")
    if inside(Path.cwd()):
        raise BundleError(f"{flag} {out} is or holds the current directory ({Path.cwd()}), and a build replaces "
                          f"{flag} and deletes the old directory; run the build from another directory")
