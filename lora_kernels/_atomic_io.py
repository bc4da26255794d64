"""Replace a directory of files atomically: a crash at any point leaves the old directory or the new
one, never a mix (used by ``save_adapter``).

1. The new files are written into a fresh directory beside the target (same file system), each
   flushed and fsynced; entries of the old directory that are not being replaced (a README, a
   trainer's files) are hard-linked (copied where links are not possible) into it.
2. Commit: on Linux the two directories are swapped in one ``renameat2(RENAME_EXCHANGE)`` call;
   elsewhere (or where the file system refuses it) the old directory is renamed aside and the new
   one renamed into place — between those two renames the target does not exist, and
   :func:`recover` (called by every save and load) puts the old one back.
3. The old directory, now beside the target, is removed.

Leftovers of a crash before the commit are removed by the next save of the same target.
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import tempfile

STAGES = ("files-written", "before-commit", "mid-commit", "after-commit", "cleaned")
_NEW, _OLD = ".lk-new-", ".lk-old-"


def _crash_point(stage: str) -> None:
    """No-op; tests replace it to kill the process at ``stage``."""


def _write_file(path: str, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def _make_exchange():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2

    def exchange(a: str, b: str) -> bool:
        if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
            return True
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
            return False  # not supported here: fall back to two renames
        raise OSError(err, f"cannot swap {a} and {b}: {os.strerror(err)}")

    return exchange


_exchange = _make_exchange()


def _siblings(target: str, tag: str) -> list[str]:
    parent, base = os.path.split(target)
    prefix = f".{base}{tag}"
    try:
        return [os.path.join(parent, n) for n in os.listdir(parent or ".") if n.startswith(prefix)]
    except FileNotFoundError:
        return []


def recover(target: str) -> None:
    """Finish what a crash interrupted: if ``target`` is missing but an old copy was renamed aside
    (two-rename commit), put it back."""
    target = os.path.abspath(target)
    if os.path.lexists(target):
        return
    old = _siblings(target, _OLD)
    if len(old) == 1:
        os.rename(old[0], target)


def _cleanup(target: str) -> None:
    for path in _siblings(target, _NEW) + (_siblings(target, _OLD) if os.path.isdir(target) else []):
        shutil.rmtree(path, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def replace_directory(target: str | os.PathLike, files: dict[str, bytes]) -> None:
    """Make ``target`` a directory holding ``files`` ({name: content}) plus whatever else the old
    directory held, atomically (see the module docstring)."""
    target = os.path.abspath(os.fspath(target))
    if os.path.islink(target):  # replace what the link points to; the link stays
        target = os.path.realpath(target)
    recover(target)
    if os.path.lexists(target) and not os.path.isdir(target):
        raise NotADirectoryError(f"cannot save into {target}: it exists and is not a directory (a file)")
    parent, base = os.path.split(target)
    os.makedirs(parent, exist_ok=True)
    _cleanup(target)
    new = tempfile.mkdtemp(prefix=f".{base}{_NEW}", dir=parent)
    committed = False
    try:
        if os.path.isdir(target):
            os.chmod(new, os.stat(target).st_mode & 0o7777)
            for name in os.listdir(target):
                if name in files:
                    continue
                src, dst = os.path.join(target, name), os.path.join(new, name)
                if os.path.isdir(src) and not os.path.islink(src):
                    shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
                elif os.path.islink(src):
                    os.symlink(os.readlink(src), dst)
                else:
                    _link_or_copy(src, dst)
        else:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(new, 0o777 & ~umask)
        for name, data in files.items():
            _write_file(os.path.join(new, name), data)
        _fsync_dir(new)
        _crash_point("files-written")
        _crash_point("before-commit")
        if not os.path.isdir(target):
            os.rename(new, target)
            committed = True
            _fsync_dir(parent)
            _crash_point("after-commit")
            _crash_point("cleaned")
            return
        if _exchange is not None and _exchange(new, target):
            old = new  # the swap left the old directory where the new one was
        else:
            old = tempfile.mkdtemp(prefix=f".{base}{_OLD}", dir=parent)
            os.rmdir(old)
            os.rename(target, old)
            _crash_point("mid-commit")
            os.rename(new, target)
        committed = True
        _fsync_dir(parent)
        _crash_point("after-commit")
    except BaseException:
        if not committed:
            shutil.rmtree(new, ignore_errors=True)
        recover(target)
        raise
    shutil.rmtree(old, ignore_errors=True)
    _crash_point("cleaned")
