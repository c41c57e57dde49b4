"""Crash-safe folder writes: build the new content in a temporary sibling folder, swap it in only when complete.

Every writer of a checkpoint folder (save_pretrained / save_msft_checkpoint, merge, and any new one such as a quantizer)
writes through `atomic_folder`:

    with atomic_folder(out, overwrite=True, sources=[base]) as tmp:
        ...write every file into tmp...

    1. checks (before anything is written): `out` is not a file, is empty unless `overwrite`, and is not, does not
       contain and does not lie inside any of `sources` (the folders being read);
    2. yields a fresh folder `.<name>.tmp-<random>` next to `out` (same parent, so the renames stay on one filesystem);
    3. on success: fsyncs every file and the folder, renames an existing `out` to `.<name>.old-<random>`, renames the
       temporary folder to `out`, fsyncs the parent, and only then deletes the old folder;
    4. on any exception, KeyboardInterrupt included: deletes the temporary folder and re-raises. `out` is untouched.

So `out`, whenever it exists, holds either the old content, whole, or the new content, whole: no stale file of the old
one survives, and no half-written file of the new one is ever visible under `out`. The old content is never deleted before the new is
in place. A process killed outright (SIGKILL, power loss) can leave:
    - during the write: a `.<name>.tmp-*` folder next to the untouched `out`: an incomplete write, delete it;
    - between the two renames (a few microseconds): no `out`, a complete `.<name>.old-*` (the previous content) and a
      complete `.<name>.tmp-*` (the new content): rename either one to `out` (`leftovers` lists them, and loading a
      missing `out` names them in its error);
    - after the second rename: the new `out` and a `.<name>.old-*` left to delete.
Nothing deletes these leftovers automatically: they may be the only copy of a checkpoint.
"""

import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Union

PathLike = Union[str, os.PathLike]


def check_destination(out: PathLike, *, overwrite: bool, sources: Iterable[PathLike] = ()) -> Path:
    """`out` resolved (symlinks followed), or one ValueError naming it: a file, a non-empty folder without `overwrite`,
    or a folder that is, contains or lies inside one of `sources`."""
    path = Path(out).expanduser()
    real = path.resolve()
    for src in sources:
        s = Path(src).expanduser().resolve()
        where = "is" if real == s else "lies inside" if s in real.parents else "contains" if real in s.parents else None
        if where:
            raise ValueError(f"refusing to write {path}: it {where} the source model folder {src}; choose another folder")
    if real.exists() and not real.is_dir():
        raise ValueError(f"{path} exists and is not a folder")
    if not overwrite and real.is_dir() and any(real.iterdir()):
        raise ValueError(f"{path} exists and is not empty; pass overwrite=True to replace it")
    return real


def leftovers(out: PathLike) -> list[Path]:
    """The `.<name>.old-*` and `.<name>.tmp-*` folders an interrupted write left next to `out` (sorted)."""
    path = Path(out).expanduser().resolve()
    if not path.parent.is_dir():
        return []
    prefixes = (f".{path.name}.old-", f".{path.name}.tmp-")
    return sorted(p for p in path.parent.iterdir() if p.name.startswith(prefixes) and p.is_dir())


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


@contextmanager
def atomic_folder(out: PathLike, *, overwrite: bool, sources: Iterable[PathLike] = ()) -> Iterator[Path]:
    """Yield an empty temporary folder next to `out`; on success it replaces `out` whole (see the module docstring).

    overwrite: replace an existing non-empty `out` (its whole content: nothing of it survives); without it a non-empty
    `out` is refused. sources: folders the writer reads; `out` may not be, contain or lie inside any of them.
    Raises ValueError for a refused `out` before anything is created.
    """
    real = check_destination(out, overwrite=overwrite, sources=sources)
    real.parent.mkdir(parents=True, exist_ok=True)
    while True:  # os.mkdir, not tempfile.mkdtemp: the folder gets the usual permissions (umask), not 0o700
        tmp = _sibling(real, "tmp")
        try:
            tmp.mkdir()
            break
        except FileExistsError:
            continue
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if real.exists():
            old = _sibling(real, "old")
            os.rename(real, old)
        try:
            os.rename(tmp, real)
        except BaseException:
            if old is not None:
                os.rename(old, real)
            raise
        _fsync(real.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
