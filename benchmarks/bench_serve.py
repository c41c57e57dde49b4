"""`phixtral serve` under load: continuous batching against the static batches, same workload, same run.

    python benchmarks/bench_serve.py [--clients 32] [--rounds 2] [--out DIR] [--faults] [--quick]

Two servers (`phixtral serve --batching continuous` and `--batching static`, each in its own process on a free port of
127.0.0.1, the same flags otherwise) serve one workload in turns, round by round in alternating order, so that both see
the same machine load. The workload (fixed by --seed): --clients streamed completions with mixed prompt lengths
(token id prompts of 8 to 200 tokens cut from this repository's source) and mixed output lengths (8 to 128 tokens,
greedy), sent at staggered arrival times (exponential gaps, mean --gap seconds), each by its own thread with the
official openai client. Per request: time to first token (TTFT: from sending to the first streamed text), the gaps
between its streamed chunks (inter-token latency, ITL; a chunk carries one token, or several when text was held back),
its tokens (usage).
Per mode and round: throughput = all completion tokens / (last answer - first request); TTFT and ITL p50 / p99.
Both modes answer with the same greedy tokens, so they do the same work.
--faults also checks, on the continuous server (started with a 32 MiB body cap so that a 10 MB prompt reaches the
handler): a 10 MB prompt sent while a stream runs (the longest /health answer and the longest gap of the stream
meanwhile), then the other bad inputs of the limits list, each with its status.
The table is for people; the last line of output is one JSON object (also written to DIR/bench_serve.json).
"""

import argparse
import concurrent.futures
import http.client
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing the package
import common  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPT_TOKENS = (8, 24, 64, 200)
OUTPUT_TOKENS = (8, 32, 64, 128)


# --- servers ---------------------------------------------------------------------------------------------------------
class ServerProcess:
    """`phixtral serve` in a subprocess on a free port; its log goes to a file."""

    def __init__(self, mode: str, args, log_dir: Path):
        self.mode = mode
        self.log_path = log_dir / f"serve_{mode}.log"
        cmd = [sys.executable, "-m", "phixtral", "serve", "--port", "0", "--batching", mode,
               "--max-batch-size", str(args.max_batch_size), "--backend", args.backend,
               "--max-request-bytes", str(32 * 2**20)]  # fmt: skip
        if args.model:
            cmd += ["--model", args.model]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.STDOUT, stdout=self.log, text=True)
        self.port, self.name = None, None

    def wait_ready(self) -> None:
        self.port = self._wait_for_port()
        self.name = self.client().models.list().data[0].id

    def _wait_for_port(self, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the {self.mode} server exited: {self.log_path.read_text()[-2000:]}")
            m = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", self.log_path.read_text())
            if m:
                return int(m.group(1))
            time.sleep(0.1)
        raise RuntimeError(f"the {self.mode} server did not start in {timeout} s")

    def client(self):
        import openai

        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="unused", max_retries=0, timeout=600)

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


# --- the workload ----------------------------------------------------------------------------------------------------
def workload(args, tokenizer) -> list[dict]:
    """The requests: arrival time (s), prompt ids, max_tokens; the same for every mode and round."""
    rng = random.Random(args.seed)
    prompt_tokens, output_tokens = (PROMPT_TOKENS[:2], (4, 8)) if args.quick else (PROMPT_TOKENS, OUTPUT_TOKENS)
    source = "\n".join(p.read_text() for p in sorted((REPO / "phixtral").glob("*.py")))
    ids = tokenizer(source)["input_ids"]
    out, t = [], 0.0
    for _ in range(args.clients):
        n = rng.choice(prompt_tokens)
        start = rng.randrange(0, len(ids) - n)
        out.append({"arrival": t, "prompt": ids[start : start + n], "max_tokens": rng.choice(output_tokens)})
        t += rng.expovariate(1 / args.gap)
    return out


def one_request(client, job: dict, t0: float) -> dict:
    time.sleep(max(0.0, t0 + job["arrival"] - time.monotonic()))
    sent = time.monotonic()
    chunks, usage, text = [], None, ""
    kw = dict(model=job["model"], prompt=job["prompt"], max_tokens=job["max_tokens"], temperature=0)
    stream = client.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].text:
            chunks.append(time.monotonic())
            text += chunk.choices[0].text
    done = time.monotonic()
    ttft = chunks[0] - sent if chunks else done - sent
    itl = [b - a for a, b in zip(chunks, chunks[1:])]
    return {"sent": sent, "ttft": ttft, "itl": itl, "done": done, "tokens": usage.completion_tokens if usage else 0,
            "text": text}  # fmt: skip


def run_round(server: ServerProcess, jobs: list[dict]) -> dict:
    client = server.client()
    t0 = time.monotonic() + 0.2
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: one_request(client, {**job, "model": server.name}, t0), jobs))
    start, end = min(r["sent"] for r in results), max(r["done"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    ttft = sorted(r["ttft"] for r in results)
    itl = sorted(x for r in results for x in r["itl"])
    return {
        "mode": server.mode, "tokens": tokens, "wall_s": end - start, "tokens_per_s": tokens / (end - start),
        "ttft_p50_s": _q(ttft, 0.5), "ttft_p99_s": _q(ttft, 0.99),
        "itl_p50_s": _q(itl, 0.5), "itl_p99_s": _q(itl, 0.99),
        "texts": [r["text"] for r in results], "loadavg": os.getloadavg()[0],
    }  # fmt: skip


def _q(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(q * len(xs)))]


# --- faults ----------------------------------------------------------------------------------------------------------
def _request(port: int, method: str, path: str, body: bytes | None = None, headers=None) -> tuple[int, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    t = time.monotonic()
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp.status, time.monotonic() - t


def faults(server: ServerProcess) -> dict:
    """The 10 MB prompt against /health and a running stream, then each bad input's status."""
    port, json_type = server.port, {"Content-Type": "application/json"}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "def fib(n):", "max_tokens": 200, "temperature": 0,
                                                        "stream": True}), json_type)  # fmt: skip
    resp = conn.getresponse()
    arrivals, health, done = [], [], threading.Event()

    def read():
        try:
            for line in resp:
                if line.startswith(b"data: "):
                    arrivals.append(time.monotonic())
        except OSError:  # closed once the 10 MB request is answered
            pass

    def poll():
        while not done.is_set():
            health.append(_request(port, "GET", "/health")[1])
            time.sleep(0.02)

    reader, poller = threading.Thread(target=read), threading.Thread(target=poll)
    reader.start()
    while len(arrivals) < 3 and reader.is_alive():
        time.sleep(0.01)
    poller.start()
    big = json.dumps({"prompt": "lorem ipsum " * 900_000, "max_tokens": 4}).encode()
    t = time.monotonic()
    status, seconds = _request(port, "POST", "/v1/completions", big, json_type)
    window = (t, time.monotonic())
    done.set()
    poller.join()
    conn.sock.shutdown(2)  # the stream has served its purpose: leaving ends it on the server at the next step
    reader.join()
    conn.close()
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:]) if window[0] <= b <= window[1] + 0.5]
    out = {"10MB prompt": {"status": status, "answer_s": seconds, "health_max_s": max(health),
                           "stream_gap_max_s": max(gaps) if gaps else 0.0, "bytes": len(big)}}  # fmt: skip
    ok = json.dumps({"prompt": "x", "max_tokens": 2}).encode()
    cases = {
        "2000 stop strings of 800 chars": (json.dumps({"prompt": "x", "stop": ["x" * 800] * 2000}).encode(), json_type),
        "200 prompts": (json.dumps({"prompt": ["ab"] * 200, "max_tokens": 16}).encode(), json_type),
        "Content-Type: text/plain": (ok, {"Content-Type": "text/plain"}),
        "foreign Host": (ok, {**json_type, "Host": "rebound.example"}),
        "foreign Origin": (ok, {**json_type, "Origin": "http://evil.example"}),
    }
    for name, (body, headers) in cases.items():
        status, seconds = _request(port, "POST", "/v1/completions", body, headers)
        out[name] = {"status": status, "answer_s": seconds}
    out["health after"] = {"status": _request(port, "GET", "/health")[0]}
    return out


# --- main ------------------------------------------------------------------------------------------------------------
def run(args) -> dict:
    from transformers import AutoTokenizer

    import phixtral

    env = common.environment(torch.device("cpu"))
    env["loadavg_before"] = os.getloadavg()
    out = common.out_dir(args.out)
    out.mkdir(parents=True, exist_ok=True)
    servers = {mode: ServerProcess(mode, args, out) for mode in args.modes}  # they start while the tokenizer loads
    rounds = []
    try:
        jobs = workload(args, AutoTokenizer.from_pretrained(str(args.model or phixtral.default_model_path())))
        for server in servers.values():
            server.wait_ready()
        for server in servers.values():  # warm-up: the first forward of each shape
            list(
                server.client().completions.create(
                    prompt=jobs[0]["prompt"], model=server.name, max_tokens=4, stream=True
                )
            )
        for r in range(args.rounds):
            for mode in args.modes if r % 2 == 0 else args.modes[::-1]:
                row = run_round(servers[mode], jobs)
                row["round"] = r
                rounds.append(row)
                print(f"round {r} {mode}: {row['tokens']} tokens in {row['wall_s']:.1f} s", file=sys.stderr)
        fault = faults(servers["continuous"]) if args.faults and "continuous" in servers else None
    finally:
        for server in servers.values():
            server.close()
    env["loadavg_after"] = os.getloadavg()
    same = len({tuple(r["texts"]) for r in rounds}) == 1
    for r in rounds:
        del r["texts"]
    summary = {}
    for mode in args.modes:
        rows = [r for r in rounds if r["mode"] == mode]
        summary[mode] = {k: sum(r[k] for r in rows) / len(rows) for k in ("tokens_per_s", "ttft_p50_s", "ttft_p99_s",
                                                                           "itl_p50_s", "itl_p99_s")}  # fmt: skip
    ratios = {}
    if "continuous" in summary and "static" in summary:
        c, s = summary["continuous"], summary["static"]
        ratios = {
            "throughput_x": c["tokens_per_s"] / s["tokens_per_s"],
            "ttft_p50_x": c["ttft_p50_s"] / s["ttft_p50_s"],
        }
    workload_info = {"clients": args.clients, "gap_s": args.gap, "seed": args.seed,
                     "max_batch_size": args.max_batch_size, "quick": args.quick}  # fmt: skip
    return {"env": env, "workload": workload_info, "rounds": rounds, "summary": summary, "ratios": ratios,
            "same_answers": same, "faults": fault}  # fmt: skip


def report(result: dict, out: Path) -> None:
    env = result["env"]
    print(f"\n{common.describe(env)}; load average {env['loadavg_before'][0]:.2f} before, "
          f"{env['loadavg_after'][0]:.2f} after")  # fmt: skip
    w = result["workload"]
    print(f"{w['clients']} clients, mean arrival gap {w['gap_s']} s, max batch {w['max_batch_size']}, "
          f"same answers in every round and mode: {result['same_answers']}\n")  # fmt: skip
    columns = [("round", "round"), ("mode", "mode"), ("tokens", "tokens"), ("wall_s", "wall s"),
               ("tokens_per_s", "tokens/s"), ("ttft_p50_s", "TTFT p50 s"), ("ttft_p99_s", "TTFT p99 s"),
               ("itl_p50_s", "ITL p50 s"), ("itl_p99_s", "ITL p99 s"), ("loadavg", "load")]  # fmt: skip
    print(common.markdown_table(result["rounds"], columns))
    if result["ratios"]:
        r = result["ratios"]
        print(f"\ncontinuous / static: throughput x{r['throughput_x']:.2f}, TTFT p50 x{r['ttft_p50_x']:.2f}")
    if result["faults"]:
        print("\nfaults (continuous server):")
        for name, row in result["faults"].items():
            print(f"  {name}: " + ", ".join(f"{k} {common.fmt_num(v)}" for k, v in row.items()))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="checkpoint (default: the bundled tiny phixtral)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--gap", type=float, default=0.1, help="mean gap between arrivals, seconds")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=["static", "continuous"], choices=["static", "continuous"])
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads of each server")
    p.add_argument("--faults", action="store_true", help="also the fault checks (see the module docstring)")
    p.add_argument("--quick", action="store_true", help="short prompts and outputs (8 tokens at most): a smoke test")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    return common.run_script(args, run, report, "bench_serve.json")


if __name__ == "__main__":
    main()
