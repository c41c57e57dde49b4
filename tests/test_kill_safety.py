"""Writers killed outright (SIGKILL) at chosen moments, over an existing checkpoint: what is left must be the old folder
whole or the new one whole (or, where the OS cannot exchange two folders, both complete copies named in the error), and
the next write must succeed and clean up.

Each case runs the writer in a child process that pauses at one moment (a hook wrapped around a function of
phixtral.atomic or phixtral.checkpoint_writer, printing PAUSED and sleeping); the test then kills it with SIGKILL.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from helpers_models import msft_moe_checkpoint
from phi_checkpoints import make_phi

import phixtral
from phixtral.atomic import leftovers
from phixtral.cli import main as cli_main

pytestmark = pytest.mark.skipif(
    not hasattr(signal, "SIGKILL") or sys.platform != "linux", reason="needs SIGKILL and flock"
)

ROOT = Path(__file__).resolve().parents[1]

# The child: installs one pause, then runs the writer. argv: moment, n, then the writer's arguments (JSON).
CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    moment, n, job = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    calls = []

    def pause():
        print("PAUSED", flush=True)
        time.sleep(600)

    def after_call(fn):  # run fn, then pause at its n-th call
        def wrapped(*a, **kw):
            out = fn(*a, **kw)
            calls.append(1)
            if len(calls) == n:
                pause()
            return out
        return wrapped

    import phixtral
    import phixtral.atomic as atomic
    import phixtral.checkpoint_writer as writer
    if moment == "shard":  # the n-th shard is on disk
        writer.write_safetensors = after_call(writer.write_safetensors)
    if moment == "written":  # every file written, nothing fsynced or published
        real_fsync_tree = atomic._fsync_tree
        atomic._fsync_tree = lambda folder: (pause(), real_fsync_tree(folder))
    elif moment == "exchanged":  # the new folder is `out`, the old one not yet deleted
        atomic._exchange = after_call(atomic._exchange)
    elif moment == "renamed":  # no exchange: after the n-th of tmp -> new, out -> old, new -> out
        atomic._exchange = lambda a, b: False
        real_rename = os.rename
        atomic.os = type(sys)("os_with_paused_rename")
        atomic.os.__dict__.update(os.__dict__)
        atomic.os.rename = after_call(real_rename)
    if job["kind"] == "save":
        model = phixtral.from_pretrained(job["src"], backend="torch")
        model.save_pretrained(job["out"], max_shard_bytes=job["shard_bytes"])
    else:
        from phixtral.cli import main
        sys.exit(main(job["argv"]))
    print("FINISHED", flush=True)
    """
)


def checkpoint_files(folder: Path) -> dict:
    """{name: bytes} of what loading reads (logs with timings left out)."""
    keep = lambda p: p.suffix == ".safetensors" or p.name in ("config.json", "model.safetensors.index.json")  # noqa: E731
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and keep(p)}


def kill_at(moment: str, n: int, job: dict) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, moment, str(n), json.dumps(job)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        for line in child.stdout:
            if line.strip() == "PAUSED":
                child.send_signal(signal.SIGKILL)
                break
        else:
            pytest.fail(f"the writer never reached {moment} #{n}: exit {child.wait()}, {child.stderr.read()[-2000:]}")
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
        child.stderr.close()


# (moment, n, what `out` holds right after the kill: "old", "new" or "missing")
MOMENTS = [
    ("shard", 1, "old"),
    ("shard", 2, "old"),
    ("written", 1, "old"),
    ("exchanged", 1, "new"),
    ("renamed", 1, "old"),  # the new folder is complete under .out.new-*
    ("renamed", 2, "missing"),  # between the renames: .out.new-* and .out.old-*, both complete
    ("renamed", 3, "new"),  # the old folder not yet deleted
]


def state_after_kill(out: Path, holds: str) -> dict:
    """The checkpoint files a kill left: those of `out`, or where `out` is missing, of the complete `.out.new-*`."""
    if holds != "missing":
        phixtral.from_pretrained(out, backend="torch")  # loads as it is
        return checkpoint_files(out)
    assert not out.exists()
    with pytest.raises(ValueError, match=r"interrupted save left .*\.new-.* \(the new checkpoint, complete\)"):
        phixtral.from_pretrained(out, backend="torch")
    (complete,) = leftovers(out, ("new",))
    return checkpoint_files(complete)


def check_kill(out: Path, moment: str, n: int, holds: str, job: dict, write) -> None:
    """Kill the writer at (moment, n); `out` must hold the old or the new checkpoint whole; `write()` (the same writer,
    run to the end) must then succeed and leave nothing beside `out`."""
    old = checkpoint_files(out)
    kill_at(moment, n, job)
    after = state_after_kill(out, holds)
    write()
    new = checkpoint_files(out)
    assert old != new and leftovers(out) == []
    assert after == (old if holds == "old" else new)
    phixtral.from_pretrained(out, backend="torch")


# The whole list runs with PHIXTRAL_FAULT_TESTS=1; by default a few moments that cover each way of publishing.
EVERY_MOMENT = os.environ.get("PHIXTRAL_FAULT_TESTS", "0") not in ("", "0")


def moments(cases, default):
    return [
        pytest.param(*c, id="-".join(map(str, c[:-1]))) for i, c in enumerate(cases) if EVERY_MOMENT or i in default
    ]


@pytest.fixture(scope="module")
def save_job(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill-save")
    old = phixtral.from_pretrained(msft_moe_checkpoint(seed=0), backend="torch")
    new = phixtral.from_pretrained(msft_moe_checkpoint(seed=1), backend="torch")
    new.save_pretrained(root / "reference", max_shard_bytes=600_000)
    old.save_pretrained(root / "old", max_shard_bytes=600_000)
    return root, old, new


@pytest.mark.parametrize("moment,n,holds", moments(MOMENTS, default=(0, 3, 5)))
def test_save_killed(save_job, tmp_path, moment, n, holds):
    root, _, new_model = save_job
    out = tmp_path / "ckpt"
    shutil.copytree(root / "old", out)
    job = {"kind": "save", "src": str(msft_moe_checkpoint(seed=1)), "out": str(out), "shard_bytes": 600_000}
    check_kill(out, moment, n, holds, job, lambda: new_model.save_pretrained(out, max_shard_bytes=600_000))
    assert checkpoint_files(out) == checkpoint_files(root / "reference")


@pytest.fixture(scope="module")
def command_jobs(tmp_path_factory):
    """{command: argv writing to OUT}, with each command's output over a different checkpoint as the old folder."""
    root = tmp_path_factory.mktemp("kill-commands")
    base, experts = make_phi(root / "base", 0), [make_phi(root / "e0", 1), make_phi(root / "e1", 2)]
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "base_model": str(base), "gate_mode": "random", "dtype": "float32",
        "experts": [{"source_model": str(e), "positive_prompts": ["x"]} for e in experts],
    }))  # fmt: skip
    data = root / "data.py"
    data.write_text(Path(json.__file__).read_text() + Path(shutil.__file__).read_text()[:20000])
    moe = str(msft_moe_checkpoint())
    return {
        "merge": ["merge", str(recipe), "--max-shard-size", "0.00002"],
        "quantize": ["quantize", "--model", moe, "--bits", "4", "--group-size", "32", "--no-progress"],
        "train-router": [
            "train-router",
            "--model",
            moe,
            "--data",
            str(data),
            "--steps",
            "2",
            "--seq-len",
            "32",
            "--batch-size",
            "2",
            "--eval-every",
            "2",
            "--eval-tokens",
            "64",
            "--backend",
            "torch",
            "--no-progress",
        ],  # fmt: skip
    }


# merge writes several shards here (--max-shard-size), quantize and train-router one.
COMMAND_MOMENTS = [(command, *moment) for command in ("merge", "quantize", "train-router") for moment in MOMENTS
                   if command == "merge" or moment[:2] != ("shard", 2)]  # fmt: skip


@pytest.mark.parametrize("command,moment,n,holds", moments(COMMAND_MOMENTS, default=(1, 9, 17)))
def test_command_killed(command_jobs, tmp_path, command, moment, n, holds):
    argv = command_jobs[command]
    out = tmp_path / "out"
    shutil.copytree(msft_moe_checkpoint(seed=1), out)  # some other checkpoint, to be replaced
    (out / "stale.txt").write_text("from the old folder")
    args = [*argv, "--out", str(out), "--overwrite"]
    check_kill(
        out, moment, n, holds, {"kind": "cli", "argv": args}, lambda: cli_main(args) == 0 or pytest.fail("failed")
    )
    assert not (out / "stale.txt").exists()
