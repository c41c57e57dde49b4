"""Crash-safe writes: every checkpoint writer builds a temporary sibling folder and swaps it in only when complete.

Failures are injected where they happen in practice: the k-th safetensors shard (a full disk, Ctrl-C), the swap itself,
and a real tmpfs that runs out of space. Each time the old folder must stay byte-for-byte as it was, still load with the
same logits, and nothing may be left next to it.
"""

import errno
import fcntl
import json
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from helpers_models import msft_moe_checkpoint
from phi_checkpoints import make_phi

import phixtral
import phixtral.atomic
import phixtral.checkpoint_writer
from phixtral.atomic import atomic_folder, leftovers
from phixtral.cli import main as cli_main
from phixtral.commands.merge import RecipeError, merge, parse_recipe

IDS = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(0))


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
    """Without an atomic exchange: tmp -> .out.new-*, out -> .out.old-*, then .out.new-* -> out fails."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.bin").write_bytes(b"old")
    real, calls = os.rename, []

    def rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 3:
            raise OSError(errno.EIO, "I/O error")
        real(src, dst)

    monkeypatch.setattr(phixtral.atomic, "_exchange", lambda a, b: False)
    monkeypatch.setattr(phixtral.atomic.os, "rename", rename)
    with pytest.raises(OSError, match="I/O error"):
        with atomic_folder(out, overwrite=True) as tmp:
            (tmp / "a.bin").write_bytes(b"new")
    assert [c[1].split("-")[0] for c in calls] == [".out.new", ".out.old", "out", "out"]  # the last one restores
    assert snapshot(out) == {"a.bin": b"old"} and siblings(out) == ["out"]


def test_the_exchange_never_leaves_the_destination_missing(tmp_path, monkeypatch):
    """With renameat2's exchange there is no moment without `out`: no rename of `out` at all."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.bin").write_bytes(b"old")
    renamed, exchanged, real_exchange = [], [], phixtral.atomic._exchange

    def exchange(a, b):
        done = real_exchange(a, b)
        exchanged.append(done)
        assert out.is_dir()
        return done

    monkeypatch.setattr(phixtral.atomic, "_exchange", exchange)
    monkeypatch.setattr(phixtral.atomic.os, "rename", lambda *a: renamed.append(a) or pytest.fail("renamed"))
    with atomic_folder(out, overwrite=True) as tmp:
        (tmp / "a.bin").write_bytes(b"new")
    if exchanged != [True]:
        pytest.skip("this filesystem has no atomic exchange (renameat2 RENAME_EXCHANGE)")
    assert snapshot(out) == {"a.bin": b"new"} and siblings(out) == ["out"] and renamed == []


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "renames"])
def test_the_next_write_removes_what_killed_writes_left(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(phixtral.atomic, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    with atomic_folder(out, overwrite=True) as tmp:
        (tmp / "a.bin").write_bytes(b"v1")
    stale = {kind: tmp_path / f".out.{kind}-0000000{i}" for i, kind in enumerate(("tmp", "new", "old"))}
    for folder in stale.values():
        folder.mkdir()
        (folder / "a.bin").write_bytes(b"left behind")
    live = tmp_path / ".out.tmp-live0000"  # another writer's, still at work: its flock is held
    live.mkdir()
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with atomic_folder(out, overwrite=True) as tmp:
            assert not stale["tmp"].exists()  # garbage whatever happens next: gone before the write
            assert stale["new"].exists() and stale["old"].exists()  # complete copies: kept until `out` is new
            (tmp / "a.bin").write_bytes(b"v2")
        assert siblings(out) == [".out.tmp-live0000", "out"] and snapshot(out) == {"a.bin": b"v2"}
    finally:
        os.close(fd)
    with atomic_folder(out, overwrite=True) as tmp:
        (tmp / "a.bin").write_bytes(b"v3")
    assert siblings(out) == ["out"]


def test_files_get_the_mode_of_a_plain_open(tmp_path):
    """safetensors writes its files 0600 through a temporary file; the published folder has one mode throughout."""
    from safetensors.torch import save_file

    umask = os.umask(0o022)
    os.umask(umask)
    with atomic_folder(tmp_path / "out", overwrite=False) as tmp:
        save_file({"a": torch.zeros(2)}, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text("{}")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert modes == {"model.safetensors": 0o666 & ~umask, "config.json": 0o666 & ~umask}


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


# --- save_pretrained -------------------------------------------------------------------------------------------------
def fail_at_call(monkeypatch, k: int, error: BaseException):
    """Make the checkpoint writer's shard writes 1..k-1 run normally, then leave half a file and raise on write k."""
    real, calls = phixtral.checkpoint_writer.write_safetensors, []

    def write_safetensors(path, specs, data, metadata=None):
        calls.append(str(path))
        if len(calls) == k:
            real(path, specs, data, metadata=metadata)
            with open(path, "r+b") as f:  # what a disk that fills up mid-shard leaves behind
                f.truncate(os.path.getsize(path) // 2)
            raise error
        return real(path, specs, data, metadata=metadata)

    monkeypatch.setattr(phixtral.checkpoint_writer, "write_safetensors", write_safetensors)
    return calls


@pytest.fixture(scope="module")
def models():
    """Two different MoE models of the same shape: the one on disk (old) and the one written over it (new)."""
    old = phixtral.from_pretrained(msft_moe_checkpoint(seed=0), backend="torch")
    new = phixtral.from_pretrained(msft_moe_checkpoint(seed=1), backend="torch")
    assert not torch.equal(old(IDS), new(IDS))
    return old, new


@pytest.fixture
def saved(models, tmp_path):
    """The old model saved in 3 shards to tmp_path/ckpt: (folder, its files, its logits)."""
    folder = tmp_path / "ckpt"
    paths = models[0].save_pretrained(folder, max_shard_bytes=600_000)
    assert len(paths) == 3
    return folder, snapshot(folder), models[0](IDS)


def assert_intact(folder, files, logits):
    assert snapshot(folder) == files
    assert torch.equal(phixtral.from_pretrained(folder, backend="torch")(IDS), logits)
    assert leftovers(folder) == [], "a temporary or old folder was left behind"


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize(
    "error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()], ids=["disk-full", "ctrl-c"]
)
def test_save_failing_at_shard_k_keeps_the_old_checkpoint(models, saved, monkeypatch, k, error):
    folder, files, logits = saved
    calls = fail_at_call(monkeypatch, k, error)
    with pytest.raises(type(error)):
        models[1].save_pretrained(folder, max_shard_bytes=600_000)
    assert len(calls) == k and all(os.path.dirname(p) != str(folder) for p in calls)  # never written in place
    assert_intact(folder, files, logits)


def test_save_failing_after_the_shards_keeps_the_old_checkpoint(models, saved, monkeypatch):
    folder, files, logits = saved

    def broken(self, *args, **kwargs):
        raise RuntimeError("tokenizer write failed")

    monkeypatch.setattr(type(models[1].tokenizer), "save_pretrained", broken)
    with pytest.raises(RuntimeError, match="tokenizer write failed"):
        models[1].save_pretrained(folder)
    assert_intact(folder, files, logits)


def test_save_over_a_checkpoint_leaves_no_stale_file(models, saved):
    folder, files, _ = saved
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 6]}))
    shutil.copy(folder / "model-00001-of-00003.safetensors", folder / "model-00001-of-00009.safetensors")
    assert phixtral.from_pretrained(folder, backend="torch").eos_token_ids[1:] == [5, 6]
    paths = models[1].save_pretrained(folder)  # one shard now
    assert [p.name for p in paths] == ["model-00001-of-00001.safetensors"]
    tokenizer_files = {n for n in files if not n.startswith("model") and n != "config.json"}
    assert tokenizer_files  # no old shard, no extra shard, no generation_config.json:
    assert set(snapshot(folder)) == {"config.json", "model.safetensors.index.json", paths[0].name} | tokenizer_files
    again = phixtral.from_pretrained(folder, backend="torch")
    assert again.eos_token_ids == models[1].eos_token_ids and torch.equal(again(IDS), models[1](IDS))
    assert siblings(folder) == [folder.name]


def test_eos_ids_from_a_generation_config_are_saved(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(msft_moe_checkpoint(), src)
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    model = phixtral.from_pretrained(src, backend="torch")
    model.save_pretrained(tmp_path / "out")
    assert phixtral.from_pretrained(tmp_path / "out", backend="torch").eos_token_ids == model.eos_token_ids
    plain = phixtral.from_pretrained(msft_moe_checkpoint(), backend="torch")
    plain.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / "generation_config.json").exists()  # tokenizer and config already say it all


def test_save_refuses_folders_it_would_wrongly_replace(models, saved, tmp_path):
    folder, files, logits = saved
    with pytest.raises(ValueError, match="ckpt exists and is not empty; pass overwrite=True"):
        models[1].save_pretrained(folder, overwrite=False)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"notes is not empty and does not look like a checkpoint folder \(it has no"):
        models[1].save_pretrained(notes)
    (folder / ".git").mkdir()
    with pytest.raises(ValueError, match="it holds the subfolder '.git'"):
        models[1].save_pretrained(folder)
    (folder / ".git").rmdir()
    assert (notes / "todo.txt").read_text() == "keep me"
    assert_intact(folder, files, logits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "notes"]


@pytest.mark.parametrize("dtype", [torch.int8, torch.float64, "float99", "int8", 16], ids=str)
def test_save_rejects_a_bad_dtype_before_writing(models, tmp_path, dtype):
    allowed = r"^dtype must be None, torch.float16, torch.bfloat16, torch.float32 or one of \[.*'fp16'.*\]; got"
    with pytest.raises(ValueError, match=allowed):
        models[0].save_pretrained(tmp_path / "a" / "out", dtype=dtype)
    with pytest.raises(ValueError, match="^dtype must be"):
        phixtral.save_msft_checkpoint(tmp_path / "b", models[0].state_dict(), models[0].config, dtype=dtype)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "dtype, stored, torch_dtype",
    [("float16", "F16", torch.float16), ("bf16", "BF16", torch.bfloat16), (torch.float32, "F32", torch.float32)],
)
def test_save_accepts_dtype_names(models, tmp_path, dtype, stored, torch_dtype):
    from safetensors import safe_open

    (path,) = models[0].save_pretrained(tmp_path / "out", dtype=dtype)
    with safe_open(path, framework="pt") as f:
        assert {f.get_slice(n).get_dtype() for n in f.keys()} == {stored}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == str(torch_dtype)[6:]
    again = phixtral.from_pretrained(tmp_path / "out", backend="torch").state_dict()
    for name, t in models[0].state_dict().items():
        assert torch.equal(again[name], t.to(torch_dtype).float()), name


def test_a_save_killed_between_the_renames_is_recoverable(saved):
    """Without the exchange, a kill between `out -> .out.old-*` and `.out.new-* -> out` leaves both, complete; loading
    says which is which, and an unfinished `.out.tmp-*` is never offered as a checkpoint."""
    folder, files, logits = saved
    old = folder.parent / f".{folder.name}.old-0123abcd"
    os.rename(folder, old)
    new = folder.parent / f".{folder.name}.new-4567ef01"
    shutil.copytree(old, new)
    unfinished = folder.parent / f".{folder.name}.tmp-89abcdef"
    unfinished.mkdir()
    assert leftovers(folder) == [new, old, unfinished]
    with pytest.raises(
        ValueError,
        match=r"interrupted save left .*\.new-4567ef01 \(the new checkpoint, complete\) and "
        r".*\.old-0123abcd \(the previous checkpoint, complete\).*tmp-\* folder is an unfinished write",
    ):
        phixtral.from_pretrained(folder, backend="torch")
    os.rename(old, folder)  # the documented recovery
    assert snapshot(folder) == files and torch.equal(phixtral.from_pretrained(folder, backend="torch")(IDS), logits)


# --- merge -----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def merge_sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge-sources")
    base, experts = make_phi(root / "base", 0), [make_phi(root / "e0", 1), make_phi(root / "e1", 2)]
    return base, experts


def random_recipe(base, experts):
    experts = [{"source_model": str(e), "positive_prompts": ["x"]} for e in experts]
    return parse_recipe({"base_model": str(base), "gate_mode": "random", "dtype": "float32", "experts": experts})


@pytest.fixture
def merged(merge_sources, tmp_path):
    out = tmp_path / "moe"
    merge(random_recipe(*merge_sources), out, seed=0, max_shard_bytes=30_000, progress=False)
    model = phixtral.from_pretrained(out, backend="torch")
    return out, snapshot(out), model(IDS % model.config.vocab_size)


@pytest.mark.parametrize("k", [1, 2])
def test_merge_overwrite_failing_at_shard_k_keeps_the_old_model(merge_sources, merged, monkeypatch, k):
    out, files, logits = merged
    assert len([n for n in files if n.startswith("model-0")]) > 2
    fail_at_call(monkeypatch, k, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(OSError, match="No space left"):
        merge(random_recipe(*merge_sources), out, overwrite=True, seed=1, max_shard_bytes=30_000, progress=False)
    assert snapshot(out) == files and siblings(out) == ["moe"]
    model = phixtral.from_pretrained(out, backend="torch")
    assert torch.equal(model(IDS % model.config.vocab_size), logits)


def test_merge_overwrite_leaves_no_stale_file(merge_sources, merged):
    out, files, logits = merged
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))
    report = merge(random_recipe(*merge_sources), out, overwrite=True, seed=1, progress=False)
    assert [p.name for p in report.files] == ["model-00001-of-00001.safetensors"]
    names = set(snapshot(out))
    assert "generation_config.json" not in names and not {n for n in files if n.startswith("model-0")} & names
    model = phixtral.from_pretrained(out, backend="torch")
    assert not torch.equal(model(IDS % model.config.vocab_size), logits)  # seed 1: other gates


@pytest.mark.parametrize(
    "where, match",
    [
        (lambda base, e: base, "it is the source model folder"),
        (lambda base, e: e[1], "it is the source model folder"),
        (lambda base, e: base / "moe", "it lies inside the source model folder"),
        (lambda base, e: base.parent, "it contains the source model folder"),
    ],
    ids=["base", "expert", "inside", "containing"],
)
@pytest.mark.parametrize("overwrite", [False, True], ids=["", "overwrite"])
def test_merge_out_at_a_source_is_refused(merge_sources, where, match, overwrite):
    base, experts = merge_sources
    out = where(base, experts)
    before = {p: snapshot(p) for p in (base, *experts)}
    with pytest.raises(RecipeError, match=f"^--out: refusing to write {re.escape(str(out))}: {match}"):
        merge(random_recipe(base, experts), out, overwrite=overwrite, progress=False)
    assert {p: snapshot(p) for p in (base, *experts)} == before
    assert not (base / "moe").exists() and leftovers(out) == []


def test_merge_cli_out_at_a_source_is_one_line(merge_sources, tmp_path, capsys):
    base, experts = merge_sources
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "base_model": str(base), "gate_mode": "random", "experts": [{"source_model": str(e)} for e in experts],
    }))  # fmt: skip
    before = snapshot(experts[0])
    assert cli_main(["merge", str(recipe), "--out", str(experts[0]), "--overwrite"]) == 1
    err = capsys.readouterr().err
    e0 = experts[0]
    one_line = (
        f"phixtral merge: error: --out: refusing to write {e0}: it is the source model folder {e0}; "
        "choose another folder"
    )
    assert err == one_line + "\n"
    assert snapshot(experts[0]) == before


# --- a real full disk ------------------------------------------------------------------------------------------------
@pytest.fixture
def small_tmpfs(tmp_path):
    """mount(size) -> a fresh tmpfs of `size` bytes; skipped where the machine does not allow mounting one."""
    mounted = []

    def mount(size: int):
        point = tmp_path / f"tmpfs{len(mounted)}"
        point.mkdir()
        try:
            command = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)]
            r = subprocess.run(command, capture_output=True, text=True)
        except OSError as e:
            pytest.skip(f"cannot run mount: {e}")
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {(r.stderr or r.stdout).strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


def on_disk(folder) -> dict:
    """{file name: bytes it takes on a tmpfs} (whole 4 KiB pages)."""
    return {p.name: -(-p.stat().st_size // 4096) * 4096 for p in sorted(folder.iterdir())}


def test_a_real_full_disk_keeps_the_old_checkpoint(models, tmp_path, small_tmpfs, monkeypatch):
    old, new = models
    old.save_pretrained(tmp_path / "fp32", max_shard_bytes=600_000)
    new.save_pretrained(tmp_path / "fp16", dtype=torch.float16)
    fp32, fp16 = on_disk(tmp_path / "fp32"), on_disk(tmp_path / "fp16")
    shard1, shard2 = fp32["model-00001-of-00003.safetensors"], fp32["model-00002-of-00003.safetensors"]
    # Room for the old checkpoint plus 1.5 shards of the new one (a new fp32 save runs out of space in its second
    # shard), and at least for a whole fp16 one (which then fits).
    point = small_tmpfs(sum(fp32.values()) + max(shard1 + shard2 // 2, sum(fp16.values()) + 2**17))
    folder = point / "ckpt"
    old.save_pretrained(folder, max_shard_bytes=600_000)
    files, logits, used = snapshot(folder), old(IDS), shutil.disk_usage(point).used
    calls = fail_at_call(monkeypatch, 0, AssertionError("unused"))  # k=0: a spy that never fails
    with pytest.raises(Exception) as info:
        new.save_pretrained(folder, max_shard_bytes=600_000)
    e = info.value
    assert getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in str(e), repr(e)
    assert len(calls) >= 2  # the disk filled up after a whole new shard was written
    assert_intact(folder, files, logits)
    assert shutil.disk_usage(point).used == used  # the partial new checkpoint is gone
    new.save_pretrained(folder, dtype=torch.float16)
    assert on_disk(folder) == fp16 and leftovers(folder) == []
    again = phixtral.from_pretrained(folder, dtype=torch.float16, backend="torch")
    assert torch.equal(again.wte.weight, new.wte.weight.half())
