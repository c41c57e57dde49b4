"""Crash-safe folder writes: build the new content in a temporary sibling folder, swap it in only when complete.

Every writer of a checkpoint folder (save_pretrained / save_msft_checkpoint, merge, quantize, train-router) writes
through `atomic_folder`:

    with atomic_folder(out, overwrite=True, sources=[base]) as tmp:
        ...write every file into tmp...

    1. checks (before anything is written): `out` is not a file, is empty unless `overwrite`, and is not, does not
       contain and does not lie inside any of `sources` (the folders being read);
    2. deletes what earlier writes of `out` that were killed left behind and that can only be garbage: `.<name>.tmp-*`
       folders no live writer holds (see "Leftovers");
    3. yields a fresh folder `.<name>.tmp-<random>` next to `out` (same parent, so renames stay on one filesystem),
       locked (flock) for as long as this writer works on it;
    4. on success: gives every file the mode a plain `open()` would (safetensors writes its files 0600), fsyncs every
       file and folder, then publishes: where `out` exists and the OS can exchange two paths atomically (Linux
       renameat2 RENAME_EXCHANGE, on ext4, xfs, btrfs, tmpfs, ...), `out` and the temporary folder swap places in one
       step and the old content, now under the temporary name, is deleted; where `out` does not exist, one rename.
       Without the exchange: the temporary folder is renamed `.<name>.new-<random>` (complete, from this moment), `out`
       is renamed `.<name>.old-<random>`, the new folder is renamed to `out`, and the old one is deleted;
    5. on any exception, KeyboardInterrupt included: deletes the temporary folder and re-raises. `out` is untouched.

So `out`, whenever it exists, holds either the old content, whole, or the new content, whole: no stale file of the old
one survives, and no half-written file of the new one is ever visible under `out`. The old content is never deleted
before the new is in place.

Leftovers of a process killed outright (SIGKILL, power loss):
    - `.<name>.tmp-*`: never a complete new checkpoint (an unfinished write, or old content being deleted): garbage.
      The next write of `out` deletes those that no live writer holds (its flock tells);
    - without the exchange only, a kill between the renames leaves no `out`, a complete `.<name>.new-*` (the new
      content) and a complete `.<name>.old-*` (the previous content): rename either one to `out`. `leftovers` lists them
      and loading a missing `out` says which is which. Once a later write of `out` succeeds, it deletes them.
"""

import ctypes
import errno
import os
import secrets
import shutil
import stat
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

try:
    import fcntl
except ImportError:  # Windows: no flock; leftovers are then never deleted automatically
    fcntl = None

PathLike = Union[str, os.PathLike]
KINDS = ("tmp", "new", "old")  # the suffixes of the sibling folders, see the module docstring


def check_destination(out: PathLike, *, overwrite: bool, sources: Iterable[PathLike] = ()) -> Path:
    """`out` resolved (symlinks followed), or one ValueError naming it: a file, a non-empty folder without `overwrite`,
    or a folder that is, contains or lies inside one of `sources`."""
    path = Path(out).expanduser()
    real = path.resolve()
    for src in sources:
        s = Path(src).expanduser().resolve()
        where = "is" if real == s else "lies inside" if s in real.parents else "contains" if real in s.parents else None
        if where:
            raise ValueError(
                f"refusing to write {path}: it {where} the source model folder {src}; choose another folder"
            )
    if real.exists() and not real.is_dir():
        raise ValueError(f"{path} exists and is not a folder")
    if not overwrite and real.is_dir() and any(real.iterdir()):
        raise ValueError(f"{path} exists and is not empty; pass overwrite=True to replace it")
    return real


def leftovers(out: PathLike, kinds: Iterable[str] = KINDS) -> list[Path]:
    """The `.<name>.{tmp,new,old}-*` folders interrupted writes left next to `out` (sorted), of the given kinds."""
    path = Path(out).expanduser().resolve()
    if not path.parent.is_dir():
        return []
    prefixes = tuple(f".{path.name}.{kind}-" for kind in kinds)
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(prefixes) and p.is_dir())


def missing_folder_hint(out: PathLike) -> Optional[str]:
    """For a missing `out`: what an interrupted write left next to it and how to recover, or None when nothing."""
    complete = leftovers(out, ("new", "old"))
    if not complete:
        return None
    name = Path(out).name
    new = [p.name for p in complete if ".new-" in p.name]
    old = [p.name for p in complete if ".old-" in p.name]
    parts = [f"{', '.join(new)} (the new checkpoint, complete)"] if new else []
    parts += [f"{', '.join(old)} (the previous checkpoint, complete)"] if old else []
    return (
        f"an interrupted save left {' and '.join(parts)} next to it: rename one of them to {name} "
        f"(any .{name}.tmp-* folder is an unfinished write and can be deleted)"
    )


def _sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{secrets.token_hex(4)}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flush every file, then every folder (deepest first), so the rename publishes data that is on the disk."""
    for root, _, files in os.walk(folder, topdown=False):
        for f in files:
            _fsync(Path(root) / f)
        _fsync(Path(root))


def _usual_file_modes(folder: Path) -> None:
    """Give every file under `folder` the mode `open()` gives a new file here (umask and default ACLs applied): some
    writers (safetensors) create theirs 0600 through a temporary file."""
    probe = folder / f".mode-probe-{secrets.token_hex(4)}"
    os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    mode = stat.S_IMODE(probe.stat().st_mode)
    probe.unlink()
    for root, _, files in os.walk(folder):
        for f in files:
            path = Path(root) / f
            if stat.S_IMODE(path.lstat().st_mode) != mode and not path.is_symlink():
                os.chmod(path, mode)


def _exchange(a: Path, b: Path) -> bool:
    """Swap the paths a and b in one atomic step (Linux renameat2 RENAME_EXCHANGE): True when done, False where the OS
    or the filesystem cannot (the caller renames twice instead)."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):  # kernel or filesystem without it
        return False
    raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")


def _lock(folder: Path) -> Optional[int]:
    """An fd holding an exclusive flock on `folder` (released when the fd closes or the process dies), or None."""
    if fcntl is None:
        return None
    fd = os.open(folder, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _unlock(fd: Optional[int]) -> None:
    if fd is not None:
        os.close(fd)


def remove_stale(out: PathLike, kinds: Iterable[str] = ("tmp",)) -> list[Path]:
    """Delete the leftovers of `out` of the given kinds that no live writer holds; returns what was deleted.

    "tmp" folders are always garbage once their writer is gone; "new" and "old" ones may be the only copy of a
    checkpoint while `out` is missing, so only a successful write (which has just published `out`) deletes them.
    """
    removed = []
    if fcntl is None:
        return removed
    for folder in leftovers(out, kinds):
        try:
            fd = os.open(folder, os.O_RDONLY)
        except OSError:  # deleted meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # a live writer's folder
            os.close(fd)
            continue
        try:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        finally:
            os.close(fd)
    return removed


def _make_locked_tmp(real: Path) -> tuple[Path, Optional[int]]:
    # os.mkdir, not tempfile.mkdtemp: the folder gets the usual permissions (umask), not 0o700.
    while True:
        tmp = _sibling(real, "tmp")
        try:
            tmp.mkdir()
        except FileExistsError:
            continue
        fd = _lock(tmp)
        # Between mkdir and flock another writer's `remove_stale` may have taken the new folder for garbage and
        # deleted it: the lock is then on a removed folder, and a fresh one is made.
        try:
            if fd is None or os.path.samestat(os.fstat(fd), os.stat(tmp)):
                return tmp, fd
        except FileNotFoundError:
            pass
        _unlock(fd)


@contextmanager
def atomic_folder(out: PathLike, *, overwrite: bool, sources: Iterable[PathLike] = ()) -> Iterator[Path]:
    """Yield an empty temporary folder next to `out`; on success it replaces `out` whole (see the module docstring).

    overwrite: replace an existing non-empty `out` (its whole content: nothing of it survives); without it a non-empty
    `out` is refused. sources: folders the writer reads; `out` may not be, contain or lie inside any of them.
    Raises ValueError for a refused `out` before anything is created.
    """
    real = check_destination(out, overwrite=overwrite, sources=sources)
    real.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(real, ("tmp",))
    tmp, fd = _make_locked_tmp(real)
    try:
        try:
            yield tmp
            _usual_file_modes(tmp)
            _fsync_tree(tmp)
            _publish(tmp, real)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        _unlock(fd)
    remove_stale(real, KINDS)  # `out` is whole: what earlier killed writes left is garbage now


def _publish(tmp: Path, real: Path) -> None:
    """Put the complete folder `tmp` at `real`; on return `tmp` no longer exists (or is being deleted: garbage)."""
    if real.exists() and _exchange(tmp, real):
        _fsync(real.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # the old content, now under the temporary name
        return
    if not real.exists():
        os.rename(tmp, real)
        _fsync(real.parent)
        return
    new = _sibling(real, "new")
    os.rename(tmp, new)  # from here on the new content is complete under its own name
    old = _sibling(real, "old")
    try:
        os.rename(real, old)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    try:
        os.rename(new, real)
    except BaseException:
        os.rename(old, real)
        shutil.rmtree(new, ignore_errors=True)
        raise
    _fsync(real.parent)
    shutil.rmtree(old, ignore_errors=True)
