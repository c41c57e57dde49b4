"""What both benchmarks share: timing, the environment record, the device's two ceilings, and the table / JSON / plot
writers.

Timing: on a GPU, CUDA events around each call (calls queued back to back, so a path whose host side is slower than its
kernels is timed at its host speed, as a user would see it); on a CPU, time.perf_counter around each call. Warm-up calls
first, then as many timed calls as fit a per-measurement budget; the median and the quartiles are reported.

Ceilings, measured in the same run: the copy bandwidth of a large device-to-device copy (bytes read + bytes written) and
the rate of a large matmul (bf16 on a GPU, fp32 on a CPU), both on random data (zeros run faster on some GPUs).
"""

import datetime
import json
import math
import os
import platform
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


# --- devices and timing ----------------------------------------------------------------------------------------------
def pick_device(name: str | None = None) -> torch.device:
    """The device named, else CUDA when present, else the CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds per call: median, quartiles and minimum over `reps` timed calls."""

    median_s: float
    p25_s: float
    p75_s: float
    min_s: float
    reps: int

    @property
    def spread(self) -> float:
        """Interquartile range over the median."""
        return (self.p75_s - self.p25_s) / self.median_s if self.median_s > 0 else float("nan")


def _quantile(sorted_xs: list[float], q: float) -> float:
    pos = q * (len(sorted_xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def summarize(times: list[float]) -> Timing:
    xs = sorted(times)
    return Timing(_quantile(xs, 0.5), _quantile(xs, 0.25), _quantile(xs, 0.75), xs[0], len(xs))


def time_fn(
    fn, device: torch.device, *, budget_s: float = 0.3, warmup: int = 2, min_reps: int = 5, max_reps: int = 200
):
    """Time fn() (no arguments; its result is ignored) on `device`. Returns a Timing.

    The number of timed calls is budget_s over one warm call's time, clamped to [min_reps, max_reps].
    """
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    one = time.perf_counter() - start
    reps = int(min(max_reps, max(min_reps, budget_s / max(one, 1e-9))))
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)]
    else:
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return summarize(times)


# A timing whose reruns disagree by more than this factor is re-measured (interference from other processes, a
# first-call cost the warm-up missed, a frequency drop: one bench_moe --quick row once read 86 ms where reruns
# gave 0.3).
RERUN_DISAGREE = 3.0
# A median this many times its floor is measured once more before it is believed.
FLOOR_DISAGREE = 10.0


def time_checked(fn, device: torch.device, *, budget_s: float = 0.3, floor_s: float | None = None, max_rounds: int = 4):
    """time_fn in independent rounds, re-measured while they disagree: -> (Timing, rounds, note or None).

    Two rounds of half the budget each, then more (up to max_rounds) until the two fastest rounds' medians agree within
    RERUN_DISAGREE x. On a GPU, a fastest median over FLOOR_DISAGREE x floor_s, or under the floor (which no correct run
    can be), earns one more round. The round with the lowest median is kept (interference only adds time). The note
    says what still disagreed after the last round, for the report to flag; None when the kept timing was confirmed.
    On the CPU the floor is not checked: small shapes there are bound by per-op overhead, tens of times the floor.
    """
    rounds = [time_fn(fn, device, budget_s=budget_s / 2) for _ in range(2)]
    check_floor = bool(floor_s) and device.type == "cuda"

    def disagreement():
        fastest, second = sorted(t.median_s for t in rounds)[:2]
        if second > RERUN_DISAGREE * fastest:
            medians = ", ".join(f"{t.median_s * 1e6:.4g}" for t in rounds)
            return f"reruns disagree (medians {medians} us)", max_rounds
        if check_floor and fastest > FLOOR_DISAGREE * floor_s:
            return f"{fastest / floor_s:.0f}x the floor", 3
        if check_floor and fastest < floor_s:
            return f"below the floor ({fastest / floor_s:.2f}x): the floor or the check is wrong", 3
        return None, len(rounds)

    note, limit = disagreement()
    while note and len(rounds) < limit:
        rounds.append(time_fn(fn, device, budget_s=budget_s / 2))
        note, limit = disagreement()
    best = min(rounds, key=lambda t: t.median_s)
    if note:
        note += f" after {len(rounds)} rounds; kept the fastest"
    return best, len(rounds), note


def cuda_graph(fn):
    """Capture fn() in a CUDA graph; returns replay() -> fn's output tensor (the graph's static output).

    Warm-up runs on a side stream first (compilation, cuBLAS handles), as torch.cuda.graphs recommends.
    Raises whatever the capture raises, e.g. when fn syncs the host.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out

    replay.graph = graph  # keep the graph (and its memory pool) alive as long as replay is
    return replay


# --- correctness -----------------------------------------------------------------------------------------------------
@dataclass
class Check:
    """‖out - ref‖ / ‖ref‖ against a tolerance; NaN or Inf never passes."""

    rel_err: float
    tol: float
    finite: bool

    @property
    def ok(self) -> bool:
        return self.finite and self.rel_err <= self.tol


def rel_error(out: torch.Tensor, ref: torch.Tensor, tol: float) -> Check:
    out, ref = out.double(), ref.double()
    finite = bool(torch.isfinite(out).all())
    denom = ref.norm().item()
    err = (out - ref).norm().item() / denom if denom > 0 else (out - ref).norm().item()
    return Check(err if finite else float("inf"), tol, finite)


# --- environment -----------------------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True, timeout=10)  # fmt: skip
        if sha.returncode == 0:
            return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def environment(device: torch.device) -> dict:
    """Date, machine, versions and command line: what a result needs to be read later."""
    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "git": _git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", ""),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            sms=props.multi_processor_count,
            gpu_memory_gb=round(props.total_memory / 1e9, 1),
            cuda=torch.version.cuda,
        )
        try:
            query = ["--query-gpu=driver_version,clocks.sm,clocks.mem", "--format=csv,noheader"]
            smi = subprocess.run(["nvidia-smi", *query], capture_output=True, text=True, timeout=20)
            env["nvidia_smi"] = smi.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            env["nvidia_smi"] = None
    return env


def describe(env: dict) -> str:
    """One line of conditions for the tables."""
    where = f"{env['gpu']} (sm_{env['capability'].replace('.', '')}, {env['sms']} SMs)" if "gpu" in env else (
        f"CPU {env['cpu']} ({env['cpu_count']} cores, {env['torch_threads']} torch threads)")  # fmt: skip
    triton = env.get("triton") or "none"
    return f"{env['date']}, {where}, torch {env['torch']}, triton {triton}, python {env['python']}, git {env['git']}"


def warn_if_interpreted(env: dict) -> None:
    """On a GPU the fused provider runs the Triton kernels: under TRITON_INTERPRET they would be interpreted."""
    if env["device"].startswith("cuda") and env["triton_interpret"] not in ("", "0"):
        print(f"WARNING: TRITON_INTERPRET={env['triton_interpret']}: Triton kernels run in the interpreter, "
              "so their timings mean nothing. Unset it for benchmarks.", file=sys.stderr)  # fmt: skip


# --- ceilings --------------------------------------------------------------------------------------------------------
def measure_ceilings(device: torch.device, *, quick: bool = False) -> dict:
    """Copy bandwidth (GB/s, bytes read + written) and matmul rate (TFLOP/s) of this device, on random data.

    GPU: a 2 GiB bf16 copy and an 8192^3 bf16 matmul. CPU: a 256 MiB fp32 copy and a 2048^3 fp32 matmul (smaller with
    quick).
    """
    gen = torch.Generator(device=device).manual_seed(1234)
    if device.type == "cuda":
        copy_elems, n, dtype = 1 << 30, 8192, torch.bfloat16
    else:
        copy_elems, n, dtype = (1 << 24 if quick else 1 << 26), (1024 if quick else 2048), torch.float32
    src = torch.randn(copy_elems, device=device, generator=gen, dtype=dtype)
    dst = torch.empty_like(src)
    t_copy = time_fn(lambda dst=dst, src=src: dst.copy_(src), device, budget_s=0.2 if quick else 0.5)
    nbytes = 2 * src.numel() * src.element_size()
    del src, dst
    a = torch.randn(n, n, device=device, generator=gen, dtype=dtype)
    b = torch.randn(n, n, device=device, generator=gen, dtype=dtype)
    t_mm = time_fn(lambda a=a, b=b: a @ b, device, budget_s=0.2 if quick else 0.5, min_reps=3)
    del a, b
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "copy_gbps": nbytes / t_copy.median_s / 1e9,
        "copy_bytes": nbytes,
        "copy_spread": t_copy.spread,
        "matmul_tflops": 2 * n**3 / t_mm.median_s / 1e12,
        "matmul_shape": [n, n, n],
        "matmul_dtype": str(dtype).replace("torch.", ""),
        "matmul_spread": t_mm.spread,
    }


def floor_s(nbytes: float, flops: float, ceilings: dict) -> float:
    """The time under which no implementation runs: max(bytes / copy bandwidth, flops / matmul rate)."""
    return max(nbytes / (ceilings["copy_gbps"] * 1e9), flops / (ceilings["matmul_tflops"] * 1e12))


# --- output ----------------------------------------------------------------------------------------------------------
def first_line(exc: Exception) -> str:
    """The exception's type and the first line of its message, for a table cell."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:160]}" if text else type(exc).__name__


def run_script(args, run_benchmark, report, json_name: str) -> dict:
    """A benchmark script's main: threads, run, the tables and plot, then its JSON (file and last line of output)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    out = out_dir(args.out)
    result = run_benchmark(args)
    report(result, out)
    print(dump_json(result, out / json_name))
    return result


def out_dir(arg: str | None) -> Path:
    """--out if given, else $OUT when set, else ./out."""
    path = Path(arg or os.environ.get("OUT") or "out")
    path.mkdir(parents=True, exist_ok=True)
    return path


def fmt_time(seconds) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


def fmt_num(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:.0f}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]], formats: dict | None = None) -> str:
    """rows of dicts -> a markdown table; columns are (key, header); formats maps a key to a function value -> str."""
    formats = formats or {}
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [formats.get(k, fmt_num)(row.get(k)) for k, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _clean(obj):
    """JSON-safe: NaN and Inf become null, dataclasses become dicts."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "__dataclass_fields__"):
        return _clean(asdict(obj))
    return obj


def dump_json(obj, path: Path | None = None) -> str:
    """One line of JSON; also written to path when given."""
    text = json.dumps(_clean(obj), separators=(",", ":"), sort_keys=False)
    if path is not None:
        path.write_text(text + "\n")
    return text


def line_plots(path: Path, panels: list[list[dict]], title: str) -> str | None:
    """A grid of line plots (panels[row][col]), written as PNG. Returns why it was not written, or None.

    Each panel: {"title", "xlabel", "ylabel", "xlog", "ylog", "series": {label: (xs, ys)},
    "ref": (xs, ys, label) or None}.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as exc:
        return f"matplotlib is not installed ({exc})"
    nrows, ncols = len(panels), max(len(r) for r in panels)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 4.2 * nrows), squeeze=False)
    for r, row in enumerate(panels):
        for c in range(ncols):
            ax = axes[r][c]
            if c >= len(row):
                ax.axis("off")
                continue
            p = row[c]
            for label, (xs, ys) in p["series"].items():
                pts = [(x, y) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
                if pts:
                    ax.plot(*zip(*pts), marker="o", markersize=3, label=label)
            if p.get("ref"):
                xs, ys, label = p["ref"]
                ax.plot(xs, ys, "k--", linewidth=1, label=label)
            if p.get("xlog"):
                ax.set_xscale("log", base=2)
                ticks = sorted({x for xs, _ in p["series"].values() for x in xs})
                ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=7)
                ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            if p.get("ylog"):
                ax.set_yscale("log")
            ax.set_title(p["title"], fontsize=10)
            ax.set_xlabel(p["xlabel"])
            ax.set_ylabel(p["ylabel"])
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(textwrap.fill(title, width=int(14 * 6.5 * ncols)), fontsize=8)  # about 14 characters per inch at 8 pt
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
