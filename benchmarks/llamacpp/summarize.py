"""Summarize results.txt: per model/threads, the CLEAN runs (other processes < 0.10 cores avg)."""

import re
import sys

path = sys.argv[1] if len(sys.argv) > 1 else "/tmp/llamacpp/results.txt"
runs, cur = [], None
for line in open(path):
    m = re.match(
        r"## sweep=(\d+) model=(\S+) threads=(\d+) attempt=(\d+)\s+uptime before:.*load average: ([\d.]+)", line
    )
    if m:
        cur = dict(sweep=int(m[1]), model=m[2], t=int(m[3]), load=float(m[5]))
        runs.append(cur)
        continue
    if cur is None:
        continue
    m = re.search(r"\|\s+(pp64|tg32)\s+\|\s+([\d.]+) ± ([\d.]+)", line)
    if m:
        cur[m[1]] = (float(m[2]), float(m[3]))
    if "CLEAN" in line or "CONTENDED" in line:
        cur["clean"] = "CLEAN" in line
print(f"{'model':6} {'t':>2} {'tg32 t/s':>16} {'ms/token':>9} {'pp64 t/s':>17} {'load1':>6}  (CLEAN runs; per sweep)")
for t in (2, 1):
    for mod in ("f32", "f16", "q8_0", "q4_0"):
        for r in runs:
            if r["model"] == mod and r["t"] == t and r.get("clean") and "tg32" in r:
                tg, tgs = r["tg32"]
                pp, pps = r["pp64"]
                print(
                    f"{mod:6} {t:>2} {tg:8.2f} ± {tgs:5.2f} {1000 / tg:9.2f} {pp:9.2f} ± {pps:5.2f} {r['load']:6.2f}  "
                    f"sweep {r['sweep']}"
                )
