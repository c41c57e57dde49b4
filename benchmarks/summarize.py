"""Short summary of a gpu_check.sh run: stages, test counts, the MoE targets and generation speed,
from the files in OUT.

    python benchmarks/summarize.py OUT_DIR [--stages OUT_DIR/stages.tsv]

Targets (GPU, bf16, fused = the Triton kernels replayed from a CUDA graph):
    T=1            time <= 1.15x its floor (two experts' weights read once at the measured copy bandwidth)
    T=8..64        time <= 1.15x the floor of all four experts
    T=16384        >= 70% of the measured bf16 matmul rate
    T<=16          >= 2x the naive loop (bf16 and fp16)
Information: at T = 1 and 8, the decode chain (fused, 3 launches) against the legacy chain it replaced
(fused_legacy, 6).
Information: the tuned configs against the heuristic's (fused over fused_heuristic), when the GPU had a tuned table.
"""

import argparse
import json
import math
import re
from pathlib import Path


def _load(path: Path):
    try:
        return json.loads(path.read_text().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None


def _row(rows, dtype, T, provider):
    return next((r for r in rows if r["dtype"] == dtype and r["T"] == T and r["provider"] == provider), None)


# The counts on pytest's last line ("12 passed, 1 skipped, 2 warnings in 3.40s"; "57/170 tests collected
# (113 deselected) in 0.74s" with --collect-only --shard).
_COUNT = re.compile(r"(\d+)(?:/\d+)? (passed|failed|errors?|skipped|xfailed|xpassed|deselected|tests? collected)\b")
_FINAL = re.compile(r"\bin [\d.]+s\b")


def count_tests(log: str) -> tuple[dict, list[str]]:
    """Counts summed over the test processes of tests.log, and the processes that printed no final line.

    gpu_check.sh tags each process's lines [I/N]; an untagged log is one process. Deselected tests are left out once
    there are several processes: each deselects the others' share.
    """
    last, count = {}, None
    for line in log.splitlines():
        tag = re.match(r"\[(\d+)/(\d+)\] (.*)", line)
        shard, body = (tag.group(1), tag.group(3)) if tag else (None, line)
        if tag:
            count = int(tag.group(2))
        if _FINAL.search(body) and _COUNT.search(body):
            last[shard] = body
    shards = [str(i) for i in range(count)] if count else [None]
    totals = {}
    for shard in shards:
        for n, word in _COUNT.findall(last.get(shard, "")):
            word = "collected" if "collected" in word else word.rstrip("s") if word.startswith("error") else word
            if not (word == "deselected" and len(shards) > 1):
                totals[word] = totals.get(word, 0) + int(n)
    missing = [f"{shard}/{count}" for shard in shards if count and shard not in last]
    return totals, missing


def _status(ok) -> str:
    return "-" if ok is None else ("PASS" if ok else "MISS")


def moe_targets(moe: dict) -> list[tuple]:
    """(item, measured, target, status) rows for the MoE layer targets."""
    rows, c = moe["rows"], moe["ceilings"]
    bw, rate = c["copy_gbps"] * 1e9, c["matmul_tflops"] * 1e12
    out = []
    for provider in ("fused", "fused_eager"):
        r = _row(rows, "bfloat16", 1, provider)
        if r and r.get("median_s"):
            ratio = r["median_s"] / r["floor_s"]
            out.append((f"bf16 T=1 {provider}: time / floor", f"{ratio:.2f}x ({r['median_s'] * 1e6:.1f} us)",
                        "<= 1.15x", _status(ratio <= 1.15) if provider == "fused" else "info"))  # fmt: skip
        ratios = []
        for T in (8, 16, 32, 64):
            r = _row(rows, "bfloat16", T, provider)
            if r and r.get("median_s"):
                expert = r["weight_bytes"] / r["experts_hit"]
                floor4 = max(4 * expert / bw, r["flops"] / rate)
                ratios.append((r["median_s"] / floor4, T))
        if ratios:
            worst, T = max(ratios)
            out.append((f"bf16 T=8..64 {provider}: worst time / 4-expert floor", f"{worst:.2f}x (T={T})", "<= 1.15x",
                        _status(worst <= 1.15) if provider == "fused" else "info"))  # fmt: skip
    for T in (1, 8):
        new, old = _row(rows, "bfloat16", T, "fused"), _row(rows, "bfloat16", T, "fused_legacy")
        if new and old and new.get("median_s") and old.get("median_s"):
            out.append((f"bf16 T={T}: decode chain / legacy chain",
                        f"{new['median_s'] / old['median_s']:.2f}x "
                        f"({new['median_s'] * 1e6:.1f} us vs {old['median_s'] * 1e6:.1f} us)",
                        "< 1x", "info"))  # fmt: skip
    r = _row(rows, "bfloat16", 16384, "fused")
    if r and r.get("tflops"):
        frac = r["tflops"] / c["matmul_tflops"]
        out.append(("bf16 T=16384 fused: share of matmul rate", f"{100 * frac:.0f}% ({r['tflops']:.0f} TFLOP/s)",
                    ">= 70%", _status(frac >= 0.7)))  # fmt: skip
    speedups = [(r["speedup_vs_naive"], r["dtype"], r["T"]) for r in rows
                if r["provider"] == "fused" and r["T"] <= 16 and r.get("speedup_vs_naive")]  # fmt: skip
    if speedups:
        worst, dtype, T = min(speedups)
        out.append(
            ("T<=16 fused: worst speedup over naive", f"{worst:.2f}x ({dtype} T={T})", ">= 2x", _status(worst >= 2))
        )
    out += tuned_lines(rows)
    unstable = [f"{r['dtype']} T={r['T']} {r['provider']}: {r['note']}" for r in rows if r.get("note")]
    if unstable:
        out.append(("timings flagged (re-measured, still disagreeing)", "; ".join(unstable)[:300], "none", "check"))
    if not moe.get("ok", True):
        out.append(("MoE correctness checks", "; ".join(moe["failed_checks"])[:200], "all pass", "MISS"))
    return out


def tuned_lines(rows) -> list[tuple]:
    """Per dtype: the heuristic configs' time over the tuned configs' (both replayed from CUDA graphs), geometric mean
    over the T both timed, with the worst and best T."""
    out = []
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        ratios = []
        for r in rows:
            if r["dtype"] == dtype and r["provider"] == "fused" and r.get("median_s"):
                h = _row(rows, dtype, r["T"], "fused_heuristic")
                if h and h.get("median_s"):
                    ratios.append((h["median_s"] / r["median_s"], r["T"]))
        if ratios:
            mean = math.exp(sum(math.log(x) for x, _ in ratios) / len(ratios))
            (lo, t_lo), (hi, t_hi) = min(ratios), max(ratios)
            out.append((f"{dtype} tuned configs: heuristic time / tuned time", f"{mean:.2f}x mean over {len(ratios)} T "
                        f"({lo:.2f}x at T={t_lo} to {hi:.2f}x at T={t_hi})", ">= 1x", "info"))  # fmt: skip
    return out


def generate_lines(gen: dict) -> list[tuple]:
    out = []
    for r in gen["rows"]:
        if r.get("decode_tok_s"):
            pct = f", {r['pct_decode_floor']:.0f}% of floor" if r.get("pct_decode_floor") else ""
            pct += f", {r['decode_vs_eager']:.2f}x eager" if r.get("decode_vs_eager") else ""
            out.append((f"generate B={r['B']} {r['provider']}: decode tok/s", f"{r['decode_tok_s']:,.1f}{pct}",
                        f"TTFT {r['ttft_s'] * 1e3:.1f} ms, peak {r['peak_gb']:.1f} GB", "info"))  # fmt: skip
        elif r.get("skipped"):
            out.append(
                (
                    f"generate B={r['B']} {r['provider']}",
                    "not timed",
                    r["skipped"][:60],
                    "MISS" if r.get("ok") is False else "-",
                )
            )
    return out


def table(rows, headers) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--stages", type=Path, help="tab-separated: stage, exit code, seconds")
    args = p.parse_args(argv)
    stages = []
    if args.stages and args.stages.exists():
        stages = [line.split("\t") for line in args.stages.read_text().splitlines() if line.strip()]
        print(table(stages, ["stage", "exit", "seconds"]) + "\n")
    exits = {s[0]: s[1] for s in stages}
    rows = []
    log = args.out / "tests.log"
    if log.exists():
        totals, missing = count_tests(log.read_text())
        measured = ", ".join(f"{n} {word}" for word, n in totals.items())
        if missing:
            measured += ("; " if measured else "") + f"no summary line from process {', '.join(missing)}"
        measured = measured or "no summary line"
        passed = bool(totals) and not missing and not totals.get("failed") and not totals.get("error")
        passed = passed and exits.get("tests", "0") == "0"
        ran = any(totals.get(word) for word in ("passed", "failed", "error", "xfailed", "xpassed"))
        status = _status(passed) if ran or not totals.get("collected") else "dry run"  # collected, nothing ran
        rows.append(("GPU tests (tests/test_kernels*.py, test_moe_backward.py, test_decode_chain.py, "
                     "test_decode_graph_gpu.py)", measured, "all pass", status))  # fmt: skip
    moe = _load(args.out / "bench_moe.json")
    if moe is None:
        rows.append(("bench_moe", "no JSON", "", "MISS"))
    elif "gpu" not in moe["env"]:
        rows.append(("bench_moe", f"CPU run ({moe['env']['cpu']})", "targets are for the GPU", "-"))
    else:
        rows += moe_targets(moe)
    gen = _load(args.out / "bench_generate.json")
    rows += generate_lines(gen) if gen else [("bench_generate", "no JSON", "", "MISS")]
    where = (moe or gen or {}).get("env", {})
    print(f"summary: {where.get('gpu') or where.get('cpu', '?')}, torch {where.get('torch', '?')}, "
          f"triton {where.get('triton', '?')}, {where.get('date', '?')}\n")  # fmt: skip
    print(table(rows, ["item", "measured", "target", "status"]))


if __name__ == "__main__":
    main()
