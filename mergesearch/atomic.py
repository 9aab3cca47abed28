"""Files and directories that appear whole or not at all.

Everything mergesearch writes for a user (checkpoints, exports, the zoo, recipe
files) goes through here: written under a temporary name beside the target,
then renamed into place, so a crash, a full disk or a read-only target never
leaves a half-written result.  Operating-system errors become one
:class:`WriteError` line naming the path and the fix.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mergesearch.errors import MergesearchError

_FIXES = {
    errno.ENOSPC: "no space left on the device; free some space or choose another place",
    errno.EDQUOT: "disk quota exceeded; free some space or choose another place",
    errno.EROFS: "the file system is read-only; choose a writable place",
    errno.EACCES: "permission denied; choose a place you can write to",
    errno.EPERM: "permission denied; choose a place you can write to",
    errno.ENOTDIR: "a parent of it is a file, not a directory; choose another path",
    errno.EEXIST: "it exists and is in the way; remove it or choose another path",
    errno.EISDIR: "it is a directory; give a file name",
}


class WriteError(MergesearchError, OSError):
    """An output cannot be written (full disk, read-only, a file in the way ...)."""


class OutputExists(WriteError, FileExistsError):
    """The output exists and replacing it was not asked for."""


def write_error(path: str | Path, err: OSError) -> WriteError:
    """``err`` (raised while writing ``path``, or the file it names) as one line saying
    what to do."""
    if isinstance(err, WriteError):
        return err
    fix = _FIXES.get(err.errno) or err.strerror or str(err)
    return WriteError(f"cannot write {err.filename or path}: {fix}")


def check_target(path: Path, *, directory: bool) -> None:
    """Refuse a target that cannot be written before any work is done: an empty path,
    the current directory or one above it, a path under a regular file, a directory
    where a file is wanted (or a file where a directory is)."""
    if str(path).strip() in ("", "."):
        raise WriteError("the output path is empty or '.'; give a new file or directory name")
    here = Path.cwd().resolve()
    target = path.resolve()
    if target == here or target in here.parents:
        raise WriteError(f"{path} is the current directory or one above it; "
                         "give a new directory for the output")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise WriteError(f"cannot write {path}: {parent} is a file, not "
                                 "a directory; choose another path")
            break
    if path.exists() and path.is_dir() != directory:
        what = "a directory; give a file name" if path.is_dir() else "a file, not a directory"
        raise WriteError(f"cannot write {path}: it is {what}")


@contextmanager
def atomic_dir(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """A temporary directory to fill; on success it replaces ``path`` in one rename.

    A non-empty ``path`` is only replaced with ``overwrite``.  On any error the
    temporary directory is removed and ``path`` is left as it was.
    """
    path = Path(path).expanduser()
    check_target(path, directory=True)
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise OutputExists(f"{path} exists and is not empty; pass --overwrite "
                           "(overwrite=True) to replace it, or choose another directory")
    made: list[Path] = []  # parents created here, removed again if nothing is published
    try:
        made = _make_parents(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as err:
        _remove_new(made)
        raise write_error(path, err) from None
    try:
        yield tmp
        _publish(tmp, path)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_new(made)
        if not isinstance(err, OSError):
            raise
        err = write_error(path, err)  # named by the path the caller gave, not ``tmp``
        raise type(err)(str(err).replace(str(tmp), str(path))) from None


def _publish(tmp: Path, path: Path) -> None:
    """Rename ``tmp`` to ``path``; an old ``path`` is moved aside first, then removed."""
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a result is not
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except OSError:
        if old is not None:
            os.replace(old, path)  # put the old one back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file beside it and a rename."""
    path = Path(path).expanduser()
    check_target(path, directory=False)
    tmp = None
    made: list[Path] = []
    try:
        made = _make_parents(path)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        tmp = Path(name)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        _remove_new(made)
        raise write_error(path, err) from None
    return path


def _make_parents(path: Path) -> list[Path]:
    """Create the missing parents of ``path``; returns those made, outermost first."""
    made = []
    for parent in reversed(path.absolute().parents):
        if not parent.exists():
            parent.mkdir()
            made.append(parent)
    return made


def _remove_new(dirs: list[Path]) -> None:
    """Remove directories :func:`_make_parents` made (innermost first), if still empty."""
    for d in reversed(dirs):
        try:
            d.rmdir()
        except OSError:
            pass
