"""benchmarks/gpu_check.sh without a GPU: its syntax, the GPU tier's collection without the optional packages, and a dry
run of every stage, whole and cut short at its limits.

The GPU machine has pytest but may lack hypothesis, pytest-benchmark and matplotlib. Here they are hidden from a
subprocess: a stub package of each name that raises ImportError comes first on PYTHONPATH, and pytest loads no plugin
through entry points (pytest-benchmark's and hypothesis' own).
"""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
# as in gpu_check.sh
GPU_TIER = [
    "tests/test_kernels.py", "tests/test_kernels_random.py", "tests/test_moe_backward.py", "tests/test_decode_chain.py",
    "tests/test_kernels_gpu.py", "tests/test_decode_graph_gpu.py",
]  # fmt: skip
OPTIONAL = ("hypothesis", "pytest_benchmark", "matplotlib")

pytestmark = pytest.mark.skipif(
    shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash, timeout"
)


def _env(**extra) -> dict:
    env = {
        k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT") and not k.startswith("GPU_CHECK_")
    }
    env["PYTHONPATH"] = str(ROOT)  # this checkout's packages, not an installed copy's
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def hidden_env(tmp_path_factory) -> dict:
    """Environment of a Python in which hypothesis, pytest_benchmark and matplotlib cannot be imported."""
    stubs = tmp_path_factory.mktemp("stubs")
    for name in OPTIONAL:
        (stubs / name).mkdir()
        (stubs / name / "__init__.py").write_text(f"raise ImportError('{name} is hidden by tests/test_gpu_check.py')\n")
    return _env(PYTHONPATH=os.pathsep.join([str(stubs), str(ROOT)]), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")


def _run(cmd, env, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _collected(proc) -> list[str]:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [line for line in proc.stdout.splitlines() if "::" in line]


def test_script_parses():
    proc = _run(["bash", "-n", str(SCRIPT)], _env())
    assert proc.returncode == 0, proc.stderr


def test_gpu_tier_runs_without_the_optional_packages(hidden_env):
    probe = _run([sys.executable, "-c", "import " + ", ".join(OPTIONAL)], hidden_env)
    assert "hidden by tests/test_gpu_check.py" in probe.stderr, "the stubs must shadow the real packages"
    run = _run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "tests/test_kernels_random.py", "tests/test_kernels_gpu.py"],
        hidden_env,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "needs hypothesis" in run.stdout and re.search(r"\d+ skipped", run.stdout), run.stdout[-2000:]


def test_dry_run_of_every_stage(hidden_env, tmp_path):
    """Each stage runs its collection (tests, in two processes: together the tests collected with every package
    there), its list of compiles (warm), the tuner's candidates checked in the interpreter (tune) or a quick CPU run
    (benchmarks); every file lands in $OUT; no plot without matplotlib, and the benchmarks say so."""
    expected = _collected(_run([sys.executable, "-m", "pytest", "--collect-only", "-q", *GPU_TIER], _env()))
    env = dict(hidden_env, GPU_CHECK_DRY_RUN="1", GPU_CHECK_SHARDS="2", OUT=str(tmp_path), PYTHON=sys.executable)
    proc = _run(["bash", str(SCRIPT)], env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    files = {p.name for p in tmp_path.iterdir()}
    assert files == {"tests.log", "bench.log", "bench_moe.json", "bench_generate.json", "summary.txt", "dry-run.json"}
    tests_log = (tmp_path / "tests.log").read_text()
    assert re.search(r"aot --dry-run: \d+ distinct compiles \(--warm\)", tests_log)
    collected = [
        re.search(r"(\d+)/(\d+) tests collected", line) for line in tests_log.splitlines() if line.startswith("[")
    ]
    counts = [m.groups() for m in collected if m]
    assert len(counts) == 2 and sum(int(n) for n, _ in counts) == int(counts[0][1]) == len(expected), (
        "the same tests, shared"
    )
    bench_log = (tmp_path / "bench.log").read_text()
    assert bench_log.count("plot not written: matplotlib is not installed") == 2
    assert re.search(
        r"tune_moe --dry-run: \d+ candidates, \d+ distinct runs in the interpreter, 0 failed, table .* loads", bench_log
    )
    assert "GEMM 1 128x256x64 w8 s4 g16 tma: ok" in bench_log  # sm_90's prefill candidates, TMA ones too
    summary = (tmp_path / "summary.txt").read_text()
    item = (
        r"GPU tests \(tests/test_kernels\*\.py, test_moe_backward\.py, test_decode_chain\.py, "
        r"test_decode_graph_gpu\.py\)"
    )
    assert re.search(rf"\| {item} \| {counts[0][1]} collected \| all pass \| dry run \|", summary), summary
    assert re.search(r"\| bench_generate \| 0 \| \d+ \|", summary), summary
    assert re.search(r"\| tune \| 0 \| \d+ \|", summary), summary


def test_a_stage_cut_at_its_limit_leaves_its_log(tmp_path):
    env = _env(GPU_CHECK_DRY_RUN="1", GPU_CHECK_SHARDS="2", OUT=str(tmp_path), PYTHON=sys.executable)
    env.update({f"GPU_CHECK_LIMIT_{stage}": "1" for stage in ("WARM", "TUNE", "TESTS", "BENCH_MOE", "BENCH_GENERATE")})
    proc = _run(["bash", str(SCRIPT)], env)
    assert proc.returncode == 1, proc.stdout[-3000:]
    tests_log = (tmp_path / "tests.log").read_text()
    assert "=== warm: stopped at its 1 s limit" in tests_log and "=== tests: stopped at its 1 s limit" in tests_log
    assert "[0/2] === stopped at the 1 s limit" in tests_log and "[1/2] === stopped at the 1 s limit" in tests_log
    bench_log = (tmp_path / "bench.log").read_text()
    assert "=== tune: stopped at its 1 s limit" in bench_log and "=== bench_moe: stopped at its 1 s limit" in bench_log
    summary = (tmp_path / "summary.txt").read_text()
    for stage in ("warm", "tune", "tests", "bench_moe", "bench_generate"):
        assert re.search(rf"\| {stage} \| 124 \| \d+ \|", summary), summary
    assert "no summary line from process 0/2, 1/2" in summary and "| bench_moe | no JSON |  | MISS |" in summary


def test_warm_index_compiles_that_launch_alone(monkeypatch):
    """aot --warm: of one fused_moe call, exactly the chosen launch goes to JITFunction.warmup, with its own
    arguments."""
    import torch

    from phixtral_kernels.launches import KERNEL_MODULES, record_launches

    calls = []
    for name, module in KERNEL_MODULES.items():
        kernel = getattr(module, name)
        monkeypatch.setattr(kernel, "warmup", lambda *a, _k=kernel, **kw: calls.append((_k, a, kw)), raising=False)
    shape = dict(D=64, F=128, E=4, top_k=2)
    chains = {
        "auto": ["_fused_routing_kernel", "_grouped_gemm_kernel", "_grouped_gemm_kernel"],  # T = 5: the decode chain
        "legacy": [
            "_topk_softmax_kernel",
            "_align_kernel",
            "_grouped_gemm_kernel",
            "_grouped_gemm_kernel",
            "_combine_kernel",
        ],
    }
    for path, names in chains.items():
        launches = record_launches(5, torch.float16, **shape, path=path)
        assert [launch.kernel.__name__ for launch in launches] == names
        for index, launch in enumerate(launches):
            calls.clear()
            record_launches(5, torch.float16, **shape, path=path, warm_index=index)
            assert len(calls) == 1
            kernel, args, kwargs = calls[0]
            assert kernel is launch.kernel and "grid" in kwargs
            assert [getattr(a, "shape", a) for a in args] == [getattr(a, "shape", a) for a in launch.args]
            assert {k: v for k, v in kwargs.items() if k != "grid"} == launch.kwargs


def test_summary_sums_the_test_processes():
    spec = importlib.util.spec_from_file_location("summarize", ROOT / "benchmarks" / "summarize.py")
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
    log = (
        "=== tests\n[0/2] ..s.\n[1/2] ..F\n"
        "[0/2] 3 passed, 1 skipped in 3.40s\n[1/2] 2 passed, 1 failed, 2 warnings in 2.01s\n"
    )
    assert summarize.count_tests(log) == ({"passed": 5, "skipped": 1, "failed": 1}, [])
    assert summarize.count_tests("[0/3] 3 passed in 1.00s\n[1/3] ..\n") == ({"passed": 3}, ["1/3", "2/3"])
    assert summarize.count_tests("aot --warm: 59 compiled in 9.1 s\n== 12 passed, 3 deselected in 1.00s ==\n") == (
        {"passed": 12, "deselected": 3},
        [],
    )


def test_summary_compares_tuned_and_heuristic_configs():
    spec = importlib.util.spec_from_file_location("summarize", ROOT / "benchmarks" / "summarize.py")
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
    rows = [dict(dtype="bfloat16", T=T, provider=p, median_s=s) for T, p, s in
            [(1, "fused", 1e-4), (1, "fused_heuristic", 1.25e-4), (16, "fused", 2e-4), (16, "fused_heuristic", 1.8e-4),
             (4096, "fused", 3e-3)]]  # fmt: skip
    ((item, measured, _, status),) = summarize.tuned_lines(rows)
    assert item == "bfloat16 tuned configs: heuristic time / tuned time" and status == "info"
    assert measured == "1.06x mean over 2 T (0.90x at T=16 to 1.25x at T=1)"
    assert summarize.tuned_lines([r for r in rows if r["provider"] == "fused"]) == []
