"""Crash-safe writes: every checkpoint writer builds a temporary sibling folder and swaps it in only when complete.

Failures are injected where they happen in practice: an exception or Ctrl-C in the writer and a failed swap. Each time
the old folder must stay byte-for-byte as it was, and nothing may be left next to it.
"""

import errno
import os
import stat

import pytest

import phixtral.atomic
from phixtral.atomic import atomic_folder


def snapshot(folder) -> dict:
    """{relative path: bytes} of every file under folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def siblings(folder) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir())


# --- atomic_folder ---------------------------------------------------------------------------------------------------
def test_success_replaces_the_folder_whole(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with atomic_folder(out, overwrite=True) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-") and not any(tmp.iterdir())
        (tmp / "new.txt").write_text("new")
        assert (out / "stale.txt").is_file()  # nothing visible under `out` until the write completes
    assert snapshot(out) == {"new.txt": b"new"} and siblings(out) == ["out"]


def test_new_folder_gets_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    with atomic_folder(tmp_path / "a" / "out", overwrite=False) as tmp:
        (tmp / "x").write_text("x")
    assert stat.S_IMODE((tmp_path / "a" / "out").stat().st_mode) == 0o777 & ~umask  # not mkdtemp's 0o700


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
@pytest.mark.parametrize("exists", [True, False], ids=["over-old", "new"])
def test_failure_leaves_the_old_folder_untouched(tmp_path, error, exists):
    out = tmp_path / "out"
    if exists:
        out.mkdir()
        (out / "a.bin").write_bytes(b"old a")
    before = snapshot(out) if exists else None
    with pytest.raises(type(error)):
        with atomic_folder(out, overwrite=True) as tmp:
            (tmp / "a.bin").write_bytes(b"half of the new")
            raise error
    assert (snapshot(out) == before) if exists else not out.exists()
    assert siblings(out) == (["out"] if exists else [])


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.bin").write_bytes(b"old")
    real, calls = os.rename, []

    def rename(src, dst):  # the first rename (out -> .out.old-*) works, the second (tmp -> out) fails
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError(errno.EIO, "I/O error")
        real(src, dst)

    monkeypatch.setattr(phixtral.atomic.os, "rename", rename)
    with pytest.raises(OSError, match="I/O error"):
        with atomic_folder(out, overwrite=True) as tmp:
            (tmp / "a.bin").write_bytes(b"new")
    assert len(calls) == 3 and calls[2][1] == out  # the restoring rename
    assert snapshot(out) == {"a.bin": b"old"} and siblings(out) == ["out"]


def test_refused_destinations_are_named_and_nothing_is_created(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(src)
    cases = [  # (out, overwrite, sources, error)
        (tmp_path / "file", True, [], "file exists and is not a folder"),
        (src, False, [], "src exists and is not empty; pass overwrite=True to replace it"),
        (src, True, [src], "it is the source model folder"),
        (tmp_path / "link", True, [src], "it is the source model folder"),  # symlinks are followed
        (src / "sub" / "out", True, [src], "it lies inside the source model folder"),
        (tmp_path, True, [src], "it contains the source model folder"),
    ]
    for out, overwrite, sources, match in cases:
        before = sorted(str(p) for p in tmp_path.rglob("*"))
        with pytest.raises(ValueError, match=match) as info:
            with atomic_folder(out, overwrite=overwrite, sources=sources):
                pytest.fail("the body must not run")
        assert str(out) in str(info.value) and "\n" not in str(info.value)
        assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert (src / "config.json").read_text() == "{}"
