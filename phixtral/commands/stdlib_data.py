"""Text slices of the Python standard library's own source: the corpus the bundled tiny phixtral is trained and
evaluated on.

The standard library is on every machine that runs this package, so these corpora need no download. Four slices with
distinct styles train the four experts; `general` (the rest of the library) pretrains the base model:
    asyncio   asyncio, concurrent.futures, multiprocessing        concurrency: async/await, futures, processes, locks
    web       email, http, urllib, html, xmlrpc, wsgiref, the      protocol code: header parsing, RFC quirks, sockets
              mail and ftp clients
    docs      pydoc_data/topics.py                                  English prose: the language reference, quoted lines
    tests     every 8th test/test_*.py, up to 1.2 MB                unittest code: setUp, assertEqual, long test classes
    general   the rest of the library's .py files (no tests, GUI, codec tables or vendored packages)

Deterministic: files are taken in sorted order, read as UTF-8 (undecodable bytes replaced), cut into pieces of about
16 KB at blank lines (20 KB at most), and every 10th piece (index % 10 == 9) is held out. The exact text depends on the
Python version (recorded in the bundled model's BUILD_LOG.md); the tests slice needs Lib/test, which some Linux
distributions ship as a separate package.
"""

import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

EXPERT_SLICES = ("asyncio", "web", "docs", "tests")
SLICES = EXPERT_SLICES + ("general",)
SPLITS = ("train", "heldout")

# Pieces are cut at the first blank line after this many characters (hard cut at twice that): small enough that a slice
# made of one big file (docs) still has many pieces to split, large enough to keep whole functions together.
_PIECE_CHARS = 16_000
_HELDOUT_EVERY = 10  # every 10th piece is held out: about 10% of each slice
_TESTS_EVERY = 8  # the tests slice takes every 8th test file, for variety without 17 MB of tests
_TESTS_MAX_CHARS = 1_200_000

_PATTERNS = {
    "asyncio": ["asyncio/**/*.py", "concurrent/**/*.py", "multiprocessing/**/*.py"],
    "web": [
        "email/**/*.py", "http/**/*.py", "urllib/**/*.py", "html/**/*.py", "xmlrpc/**/*.py", "wsgiref/**/*.py",
        "smtplib.py", "imaplib.py", "poplib.py", "ftplib.py", "nntplib.py", "mailbox.py", "mimetypes.py",
    ],
    "docs": ["pydoc_data/topics.py"],
    "tests": ["test/test_*.py"],
}  # fmt: skip
# Never in `general`: tests, GUI and IDE code, codec tables, vendored or deprecated packages, build artefacts.
_GENERAL_EXCLUDED_DIRS = {
    "test", "tests", "idle_test", "idlelib", "tkinter", "turtledemo", "lib2to3", "distutils", "ensurepip", "encodings",
    "site-packages", "dist-packages", "pydoc_data", "__phello__", "__pycache__", "lib-dynload",
}  # fmt: skip


@dataclass(frozen=True)
class Piece:
    """About 16 KB of one source file: `source` is its path relative to the standard library folder."""

    source: str
    text: str


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def python_version() -> str:
    return "%d.%d.%d" % sys.version_info[:3]


def _read(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def slice_files(name: str, root: Optional[Path] = None) -> list[Path]:
    """The sorted source files of one slice (absolute paths)."""
    if name not in SLICES:
        raise ValueError(f"unknown stdlib slice {name!r}; choose one of {SLICES}")
    root = Path(root) if root is not None else stdlib_dir()
    if name == "general":
        taken = {p for s in EXPERT_SLICES for p in slice_files(s, root)}
        files = []
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root)
            if any(part in _GENERAL_EXCLUDED_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
                continue
            if rel.name.startswith("_sysconfigdata") or path in taken:  # machine-specific build data
                continue
            files.append(path)
        return files
    files = sorted({p for pattern in _PATTERNS[name] for p in root.glob(pattern) if "__pycache__" not in p.parts})
    if name != "tests":  # a package's own test folder (older Pythons have some) is test code, not the package's style
        return [p for p in files if not {"test", "tests"} & set(p.relative_to(root).parts[:-1])]
    kept, size = [], 0
    for path in files[::_TESTS_EVERY]:
        if size >= _TESTS_MAX_CHARS:
            break
        kept.append(path)
        size += path.stat().st_size
    return kept


def _cut(text: str) -> list[str]:
    """Cut text into pieces of about _PIECE_CHARS at blank lines (a hard cut at 1.25x that inside a long block)."""
    pieces, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        if size >= _PIECE_CHARS * 5 // 4 or (size >= _PIECE_CHARS and not line.strip()):
            pieces.append("".join(current))
            current, size = [], 0
        current.append(line)
        size += len(line)
    if current:
        pieces.append("".join(current))
    return [p for p in pieces if p.strip()]


def slice_pieces(name: str, split: Optional[str] = None, root: Optional[Path] = None) -> list[Piece]:
    """The pieces of a slice, in order; split "train" or "heldout" keeps one part (every 10th piece is held out)."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    root = Path(root) if root is not None else stdlib_dir()
    files = slice_files(name, root)
    if not files:
        hint = (
            " (some Linux distributions ship Lib/test separately, e.g. Debian's libpython3-testsuite)"
            if name == "tests"
            else ""
        )
        raise FileNotFoundError(f"stdlib slice {name!r}: no source files under {root}{hint}")
    pieces = [Piece(str(f.relative_to(root)), text) for f in files for text in _cut(_read(f))]
    if split is None:
        return pieces
    heldout = split == "heldout"
    return [p for i, p in enumerate(pieces) if (i % _HELDOUT_EVERY == _HELDOUT_EVERY - 1) == heldout]


def slice_texts(name: str, split: str, root: Optional[Path] = None) -> list[str]:
    """The documents of one split of a slice: a list of strings, each about 16 KB of source."""
    return [p.text for p in slice_pieces(name, split, root)]


def describe_slices(root: Optional[Path] = None) -> list[dict]:
    """Per slice: file count, train and held-out characters (for the build log)."""
    rows = []
    for name in SLICES:
        pieces = slice_pieces(name, None, root)
        held = sum(len(p.text) for i, p in enumerate(pieces) if i % _HELDOUT_EVERY == _HELDOUT_EVERY - 1)
        total = sum(len(p.text) for p in pieces)
        rows.append(
            dict(
                slice=name,
                files=len({p.source for p in pieces}),
                pieces=len(pieces),
                train_chars=total - held,
                heldout_chars=held,
            )
        )
    return rows
