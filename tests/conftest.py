# The Triton interpreter must be on before any kernel module is imported: @triton.jit reads TRITON_INTERPRET when a
# kernel is decorated. CPU tests then run the same Triton kernels on CPU tensors; GPU tests compile them as usual.
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    try:
        from triton.runtime import interpreter
    except ImportError:  # no triton: the kernel tests skip themselves
        interpreter = None
    if interpreter is not None and not interpreter.interpreter_builder.options.debug:
        # Each int32 add, sub and mul also ran an int64 overflow check whose assert is a no-op without debug: a third
        # of the interpreter's time on the kernel tests, for nothing.
        interpreter.interpreter_builder.options = interpreter.InterpreterOptions(sanitize_overflow=False)


def pytest_addoption(parser):
    parser.addoption(
        "--shard",
        metavar="I/N",
        help="run only every N-th collected test, starting at the I-th (0 <= I < N). benchmarks/gpu_check.sh runs N "
        "pytest processes at once this way, so that Triton compiles the kernel variants of N tests at a time.",
    )


def pytest_collection_modifyitems(config, items):
    shard = config.getoption("--shard")
    if not shard:
        return
    try:
        index, count = (int(part) for part in shard.split("/"))
        if not 0 <= index < count:
            raise ValueError
    except ValueError:
        raise pytest.UsageError(f"--shard must be I/N with 0 <= I < N, got {shard!r}") from None
    keep = [item for k, item in enumerate(items) if k % count == index]
    config.hook.pytest_deselected(items=[item for k, item in enumerate(items) if k % count != index])
    items[:] = keep
