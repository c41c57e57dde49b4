"""End-to-end generation, fused MoE against the naive loop: prompt tokens/s, decode tokens/s,
time to first token, memory.

    python benchmarks/bench_generate.py [--out DIR]

GPU: a phixtral-4x2_8-sized model (D=2560, 32 layers, 32 heads, E=4, top_k=2, F=10240, vocab 51200: 7.8B parameters,
     15.6 GB in fp16) built on the GPU with random weights (no host copy, no checkpoint); batch 1, 8 and 32, prompt of
     256 tokens, 64 new tokens, greedy.
CPU: a small random model (D=256, 4 layers, 8 heads, E=4, top_k=2, F=1024, vocab 1024) in fp32; batch 1, 8, 32, prompt
     64, 32 new tokens. There the fused provider is backend="torch" (the Triton kernels would run in the interpreter).

Providers:
    fused        model.generate(ids, cuda_graph=False) with the MoE backend "triton" (GPU) or "torch" (CPU): every
                 decode step launched eagerly, kernel by kernel
    fused_graph  GPU only: model.generate(ids, cuda_graph=True), backend "triton": the library's CUDA-graph decode
                 (phixtral/decode_graph.py), each decode step's forward replayed from a graph captured for the batch and
                 cache length; sampling eager, host reads as in `fused`. What generate() does by default on a GPU.
    naive        model.generate(ids) with backend "naive", the original phixtral loop
    NAME:scores  with --attention-upcast ... scores: `fused` and `fused_graph` again with model.attention_upcast =
                 "scores" (fp16 q, k, v into SDPA, q pre-scaled) instead of "fp32" (q, k, v upcast; the default).
                 Only fp16 models differ.
Times: time to first token (TTFT) = prefill + first token on the host, as generate() measures it (on CUDA it also
queues decode step 1 before reading the first token); decode tokens/s = B * (new - 1) / decode time. Median of --reps.
Peak memory: torch.cuda.max_memory_allocated on a GPU; on a CPU the process's peak RSS so far (it only grows).
Checks before timing: the last-position logits of a short prompt against another backend's (fused vs naive, naive vs
torch; a scores row against naive in fp32 attention), and for fused_graph the logits of its first decode steps against
eager decode steps fed the same tokens (the eager run's greedy ones), from the same prompt and cache length.
Decode floor per step = max(bytes / copy bandwidth, flops / matmul rate), with bytes = the weights a step reads (all but
the experts, plus min(E, B * top_k) experts per layer: a bound, not the routing) + the KV cache at the mean context.
Random weights spread tokens evenly over the experts; a real checkpoint need not (phixtral-4x2_8's router ties).
"""

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing the package

import common  # noqa: E402

from phixtral import Phixtral, PhixtralConfig  # noqa: E402
from phixtral.generate import generate_tokens  # noqa: E402

GPU_MODEL = dict(vocab_size=51200, n_embd=2560, n_layer=32, n_head=32, n_positions=2048, rotary_dim=32, n_inner=10240,
                 num_local_experts=4, num_experts_per_tok=2)  # fmt: skip  # phixtral-4x2_8
CPU_MODEL = dict(vocab_size=1024, n_embd=256, n_layer=4, n_head=8, n_positions=512, rotary_dim=16, n_inner=1024,
                 num_local_experts=4, num_experts_per_tok=2)  # fmt: skip
QUICK_MODEL = dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128, rotary_dim=8, n_inner=128,
                   num_local_experts=4, num_experts_per_tok=2)  # fmt: skip
# ‖logits - ref‖ / ‖ref‖ between two backends, after every layer's roundings, per model: about 2.5x the error measured
# on the CPU (torch against naive, the checks' prompts, seeds 0-3). The random stack amplifies rounding with depth and
# width, so each model has its own:
#   quick  fp32 1.5e-7, fp16 7.5e-4, bf16 5.3e-3
#   cpu    fp32 4.0e-7, fp16 1.2e-3, bf16 1.9e-2
#   gpu    fp16 2e-3, bf16 0.27 (32 layers, D=2560; each bf16 backend is 0.44 away from fp32; the MoE layer alone is
#          held to 2e-2 in bench_moe); fp32 kept at 1e-4, not measured on a GPU.
TOLERANCE = {
    "quick": {torch.float32: 4e-7, torch.float16: 2e-3, torch.bfloat16: 1.5e-2},
    "cpu": {torch.float32: 1e-6, torch.float16: 3e-3, torch.bfloat16: 5e-2},
    "gpu": {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 0.6},
}
MODES = {"fused": "generate, eager [{}]", "naive": "generate [naive]", "fused_graph": "generate, CUDA graph [triton]"}
GRAPH_CHECK_STEPS = 8  # decode steps whose logits the fused_graph check compares


# --- the model -------------------------------------------------------------------------------------------------------
def build_model(config: PhixtralConfig, dtype, device, seed: int = 0) -> Phixtral:
    """A random-weight model built directly on `device` in `dtype` (15.6 GB never passes through the host).

    Every weight ~ N(0, 0.02) (biases too, so none is zero), LayerNorm weights 1.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Phixtral(config)
    finally:
        torch.set_default_dtype(previous)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, torch.nn.LayerNorm) and name == "weight":
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=g)
    return model.eval()


def param_counts(model: Phixtral) -> dict:
    """Parameters by role: one expert, all experts, the embedding, and everything else (attention, norms, router,
    head)."""
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for b in model.h for p in (*b.moe.fc1.parameters(), *b.moe.fc2.parameters()))
    E, L = model.config.num_local_experts, model.config.n_layer
    wte = model.wte.weight.numel()
    head = sum(p.numel() for p in model.lm_head.parameters())
    return {"total": total, "expert": experts // (E * L), "experts": experts, "wte": wte, "lm_head": head,
            "other": total - experts - wte}  # fmt: skip


def floors(model: Phixtral, B: int, S: int, N: int, ceilings: dict) -> dict:
    """Floor of one decode step and of the prefill at batch B, prompt S, N new tokens (see the module docstring)."""
    c, n = model.config, param_counts(model)
    elem = torch.finfo(model.dtype).bits // 8
    E, k, L, D = c.num_local_experts, c.num_experts_per_tok, c.n_layer, c.n_embd
    kv_row = 2 * L * c.n_head_kv * c.head_dim * elem  # bytes of one token's keys and values, all layers
    ctx = S + N / 2
    step_bytes = (n["other"] + L * min(E, B * k) * n["expert"]) * elem + B * kv_row * ctx
    step_flops = 2 * B * (n["other"] + L * k * n["expert"]) + 4 * B * L * ctx * D
    prefill_bytes = (n["other"] + L * min(E, B * S * k) * n["expert"]) * elem + B * S * kv_row
    prefill_flops = (
        2 * B * S * (n["other"] - n["lm_head"] + L * k * n["expert"]) + 2 * B * n["lm_head"] + 2 * B * L * S * S * D
    )
    return {"decode_floor_s": common.floor_s(step_bytes, step_flops, ceilings),
            "prefill_floor_s": common.floor_s(prefill_bytes, prefill_flops, ceilings)}  # fmt: skip


def fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


# --- providers -------------------------------------------------------------------------------------------------------
def last_logits(model: Phixtral, ids: torch.Tensor, backend: str) -> torch.Tensor:
    """Logits [B, V] fp32 of the last prompt position, without a cache."""
    model.set_backend(backend)
    with torch.inference_mode():
        return model(ids)[:, -1]


def graph_check(model: Phixtral, ids: torch.Tensor, N: int, tol: float, steps: int = GRAPH_CHECK_STEPS) -> common.Check:
    """The logits of the first `steps` decode steps replayed from the CUDA graph against eager decode steps, both fed
    the eager run's greedy tokens (so one near-tie of a random model cannot send the two runs apart), at the cache
    length of N new tokens. Leaves the graph captured for the timed runs."""
    logits = {False: [], True: []}
    fed = []

    def eager_sampler(x):
        logits[False].append(x.clone())
        fed.append(x.argmax(-1))
        return fed[-1]

    def graph_sampler(x):
        logits[True].append(x.clone())
        i = len(logits[True]) - 1
        return fed[i] if i < len(fed) else x.argmax(-1)  # the runs take the same steps; past them, anything goes

    for graph, sampler in ((False, eager_sampler), (True, graph_sampler)):
        stats = {"prefill_s": 0.0, "decode_s": 0.0}
        steps_run = generate_tokens(model, ids, max_new_tokens=N, sampler=sampler, stats=stats, cuda_graph=graph)
        for i, _ in enumerate(steps_run):
            if i >= steps:
                break
        steps_run.close()
        if graph and not stats.get("cuda_graph"):
            raise RuntimeError("generate_tokens(cuda_graph=True) did not replay a graph")
    n = min(len(logits[False]), len(logits[True]))
    # Entry 0 is the prefill's, eager in both runs.
    return common.rel_error(torch.stack(logits[True][1:n]), torch.stack(logits[False][1:n]), tol)


def peak_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def median(xs):
    return common.summarize(xs).median_s


def run_eager(model, backend, ids, N, reps, device) -> dict:
    model.set_backend(backend)
    model.generate(ids, max_new_tokens=2, cuda_graph=False)  # warm-up: compiles the prefill and decode shapes
    reset_peak(device)
    stats = []
    for _ in range(reps):
        model.generate(ids, max_new_tokens=N, cuda_graph=False)
        stats.append(model.last_generation_stats)
    return {"ttft_s": median([s.prefill_s for s in stats]), "decode_s": median([s.decode_s for s in stats]),
            "new_tokens": stats[0].new_tokens, "peak_gb": peak_memory_gb(device)}  # fmt: skip


def run_graph(model, ids, N, reps, device, tol) -> dict:
    model.set_backend("triton")
    model.generate(ids, max_new_tokens=2, cuda_graph=False)  # compiles the prefill and decode kernels eagerly first
    reset_peak(device)
    check = graph_check(model, ids, N, tol)  # captures the graph at this batch and cache length
    if not check.ok:
        return {"check": check}
    stats = []
    for _ in range(reps):
        model.generate(ids, max_new_tokens=N, cuda_graph=True)
        stats.append(model.last_generation_stats)
    if not all(s.cuda_graph for s in stats):
        raise RuntimeError("generate(cuda_graph=True) decoded without the graph")
    return {"ttft_s": median([s.prefill_s for s in stats]), "decode_s": median([s.decode_s for s in stats]),
            "new_tokens": stats[0].new_tokens, "peak_gb": peak_memory_gb(device), "check": check}  # fmt: skip


# --- the run ---------------------------------------------------------------------------------------------------------
def run_benchmark(args) -> dict:
    device = common.pick_device(args.device)
    gpu = device.type == "cuda"
    size = "quick" if args.quick else ("gpu" if gpu else "cpu")
    spec = {"quick": QUICK_MODEL, "cpu": CPU_MODEL, "gpu": GPU_MODEL}[size]
    config = PhixtralConfig(**spec)
    dtype = getattr(torch, args.dtype or ("float16" if gpu else "float32"))
    S, N = args.prompt, args.new_tokens
    env = common.environment(device)
    common.warn_if_interpreted(env)
    print(f"# generation benchmark: {common.describe(env)}")
    ceilings = common.measure_ceilings(device, quick=args.quick)
    print(
        f"# ceilings: copy {ceilings['copy_gbps']:.1f} GB/s, "
        f"{ceilings['matmul_dtype']} matmul {ceilings['matmul_tflops']:.2f} TFLOP/s"
    )
    start = time.monotonic()
    model = build_model(config, dtype, device, seed=args.seed)
    counts = param_counts(model)
    print(f"# model: {fmt_params(counts['total'])} parameters "
          f"({counts['total'] * (torch.finfo(dtype).bits // 8) / 1e9:.2f} GB in {str(dtype).replace('torch.', '')}), "
          f"built in {time.monotonic() - start:.1f} s; prompt {S}, {N} new tokens")  # fmt: skip
    fused_backend = "triton" if gpu else "torch"
    tol = TOLERANCE[size][dtype]
    deadline = start + args.budget_s

    # Checks: last-position logits of a short prompt, each backend against another one.
    g = torch.Generator(device=device).manual_seed(args.seed + 1)
    check_ids = torch.randint(0, config.vocab_size, (2, min(S, 32)), device=device, generator=g)
    ref = {}
    for backend in dict.fromkeys((fused_backend, "naive", "torch")):
        try:
            ref[backend] = last_logits(model, check_ids, backend)
        except Exception as exc:  # noqa: BLE001 -- the provider's row reports it
            ref[backend] = f"backend {backend} raised {common.first_line(exc)}"
    upcasts = [u for u in dict.fromkeys(args.attention_upcast) if u != "fp32"]
    for upcast in upcasts:
        key = f"{fused_backend}:{upcast}"
        try:
            model.attention_upcast = upcast
            ref[key] = last_logits(model, check_ids, fused_backend)
        except Exception as exc:  # noqa: BLE001 -- the provider's row reports it
            ref[key] = f"backend {fused_backend} with attention {upcast} raised {common.first_line(exc)}"
        finally:
            model.attention_upcast = "fp32"

    def compare(ref, a, b):  # a Check, or why there is none
        bad = [ref[x] for x in (a, b) if isinstance(ref[x], str)]
        return bad[0] if bad else common.rel_error(ref[a], ref[b], tol)

    checks = {"fused": compare(ref, fused_backend, "naive"), "naive": compare(ref, "naive", "torch")}
    checks.update({f"fused:{u}": compare(ref, f"{fused_backend}:{u}", "naive") for u in upcasts})
    del ref
    base = ["fused"] + (["fused_graph"] if gpu and not args.no_graph else [])
    names = [n if u == "fp32" else f"{n}:{u}" for u in dict.fromkeys(args.attention_upcast) for n in base] + ["naive"]
    if args.providers:
        names = [n for n in names if n in args.providers]
    rows = []
    lost = None  # why CUDA can no longer run anything in this process
    for B in args.batches:
        if lost:
            break
        ids = torch.randint(0, config.vocab_size, (B, S), device=device, generator=g)
        fl = floors(model, B, S, N, ceilings)
        for name in names:
            kind, _, upcast = name.partition(":")  # e.g. "fused_graph:scores"
            row = {"B": B, "provider": name, "prompt": S, **fl}
            row["mode"] = MODES[kind].format(fused_backend) + (f", attention {upcast}" if upcast else "")
            row["attention_upcast"] = upcast or "fp32"
            try:
                model.attention_upcast = upcast or "fp32"
                if lost:
                    row["skipped"] = lost
                elif time.monotonic() > deadline:
                    row["skipped"] = f"time budget (--budget-s={args.budget_s:g}) spent"
                elif kind == "fused_graph":
                    row.update(run_graph(model, ids, N, args.reps, device, tol))
                elif isinstance(checks[name], str):
                    row.update(skipped=checks[name], ok=False)
                elif not checks[name].ok:
                    row["check"] = checks[name]
                else:
                    row.update(
                        run_eager(model, fused_backend if kind == "fused" else "naive", ids, N, args.reps, device)
                    )
                    row["check"] = checks[name]
            except Exception as exc:  # noqa: BLE001 -- report it in the table and go on
                row.update(skipped=f"raised {common.first_line(exc)}", ok=False)
                if gpu:
                    try:
                        torch.cuda.synchronize()
                    except Exception as sticky:  # noqa: BLE001 -- e.g. an illegal address poisons the context
                        lost = f"CUDA context lost after B={B} {name}: {common.first_line(sticky)}"
            if lost and "skipped" not in row:
                row["skipped"] = lost
            check = row.pop("check", None)
            if check is not None:
                row.update(rel_err=check.rel_err, tol=check.tol, ok=check.ok)
                if not check.ok:
                    row["skipped"] = f"failed the check: rel. error {check.rel_err:.3g} > {check.tol:g}"
            if "decode_s" in row:
                steps = row["new_tokens"] - 1
                row.update(prompt_tok_s=B * S / row["ttft_s"],
                           decode_tok_s=B * steps / row["decode_s"] if steps > 0 else None,
                           step_s=row["decode_s"] / steps if steps > 0 else None)  # fmt: skip
                if row["step_s"]:
                    row["pct_decode_floor"] = 100 * row["decode_floor_s"] / row["step_s"]
                row["pct_prefill_floor"] = 100 * row["prefill_floor_s"] / row["ttft_s"]
            if not lost:
                model.attention_upcast = "fp32"
                model.clear_caches()
                if gpu:
                    torch.cuda.empty_cache()
            rows.append(row)
            status = "timed" if "decode_s" in row else f"not timed: {row.get('skipped')}"
            print(f"#   B={B} {name}: {status} ({time.monotonic() - start:.0f} s)", flush=True)
        naive = next((r.get("decode_tok_s") for r in rows if r["B"] == B and r["provider"] == "naive"), None)
        naive_ttft = next((r.get("ttft_s") for r in rows if r["B"] == B and r["provider"] == "naive"), None)
        for r in rows:
            if r["B"] == B and r.get("decode_tok_s") and naive:
                r["decode_vs_naive"] = r["decode_tok_s"] / naive
            if r["B"] == B and r.get("ttft_s") and naive_ttft:
                r["ttft_vs_naive"] = naive_ttft / r["ttft_s"]
            kind, _, upcast = r["provider"].partition(":")
            if r["B"] == B and kind == "fused_graph" and r.get("decode_tok_s"):
                eager = "fused" + (f":{upcast}" if upcast else "")
                eager_tok_s = next(
                    (e.get("decode_tok_s") for e in rows if e["B"] == B and e["provider"] == eager), None
                )
                if eager_tok_s:
                    r["decode_vs_eager"] = r["decode_tok_s"] / eager_tok_s
    failed = [r for r in rows if r.get("ok") is False]
    return {
        "bench": "generate",
        "env": env,
        "model": {**spec, "dtype": str(dtype).replace("torch.", ""), "parameters": counts},
        "prompt": S,
        "new_tokens": N,
        "batches": args.batches,
        "ceilings": ceilings,
        "fused_backend": fused_backend,
        "attention_upcast": args.attention_upcast,
        "rows": rows,
        "ok": not failed,
        "failed_checks": [f"B={r['B']} {r['provider']}: {r.get('skipped')}" for r in failed],
    }


# --- output ----------------------------------------------------------------------------------------------------------
COLUMNS = [
    ("B", "batch"), ("provider", "provider"), ("mode", "mode"), ("ttft_s", "TTFT"), ("prompt_tok_s", "prompt tok/s"),
    ("decode_tok_s", "decode tok/s"), ("step_s", "ms/step"), ("decode_floor_s", "step floor"),
    ("pct_decode_floor", "% floor"), ("decode_vs_eager", "decode x eager"), ("decode_vs_naive", "decode x naive"),
    ("ttft_vs_naive", "TTFT x naive"),
    ("peak_gb", "peak GB"), ("rel_err", "rel err"),
]  # fmt: skip
FORMATS = {
    "ttft_s": common.fmt_time,
    "step_s": common.fmt_time,
    "decode_floor_s": common.fmt_time,
    "prompt_tok_s": lambda v: "-" if v is None else f"{v:,.0f}",
    "decode_tok_s": lambda v: "-" if v is None else f"{v:,.1f}",
    "pct_decode_floor": lambda v: "-" if v is None else f"{v:.1f}%",
    "decode_vs_naive": lambda v: "-" if v is None else f"{v:.2f}x",
    "decode_vs_eager": lambda v: "-" if v is None else f"{v:.2f}x",
    "ttft_vs_naive": lambda v: "-" if v is None else f"{v:.2f}x",
    "peak_gb": lambda v: "-" if v is None else f"{v:.2f}",
    "rel_err": lambda v: "-" if v is None else f"{v:.1e}",
}


def report(result: dict, out: Path) -> None:
    env, m = result["env"], result["model"]
    print(f"\n## Generation, {fmt_params(m['parameters']['total'])}-parameter random phixtral (D={m['n_embd']}, "
          f"{m['n_layer']} layers, E={m['num_local_experts']}, top_k={m['num_experts_per_tok']}) in {m['dtype']}, "
          f"prompt {result['prompt']}, {result['new_tokens']} new tokens, greedy: {common.describe(env)}")  # fmt: skip
    mem = "torch.cuda.max_memory_allocated" if "gpu" in env else "process peak RSS so far (grows only)"
    print(f"ceilings: copy {result['ceilings']['copy_gbps']:.1f} GB/s, "
          f"matmul {result['ceilings']['matmul_tflops']:.2f} TFLOP/s; "
          f"fused = backend {result['fused_backend']}; peak GB = {mem}\n")  # fmt: skip
    rows = result["rows"]
    print(common.markdown_table([r for r in rows if "decode_s" in r], COLUMNS, FORMATS))
    for r in rows:
        if "decode_s" not in r:
            print(f"- B={r['B']} {r['provider']}: not timed: {r.get('skipped')}")
    names = list(dict.fromkeys(r["provider"] for r in rows))

    def series(key, scale=1.0):
        out = {}
        for n in names:
            pts = [r for r in rows if r["provider"] == n]
            out[n] = ([r["B"] for r in pts], [scale * r[key] if r.get(key) is not None else None for r in pts])
        return out

    batches = sorted({r["B"] for r in rows})
    floor_tok_s = [b / next(r["decode_floor_s"] for r in rows if r["B"] == b) for b in batches]
    panels = [[
        {"title": "decode tokens/s", "xlabel": "batch", "ylabel": "tokens/s", "xlog": True, "ylog": True,
         "series": series("decode_tok_s"), "ref": (batches, floor_tok_s, "floor")},
        {"title": "prompt tokens/s", "xlabel": "batch", "ylabel": "tokens/s", "xlog": True, "ylog": True,
         "series": series("prompt_tok_s")},
        {"title": "time to first token", "xlabel": "batch", "ylabel": "ms", "xlog": True, "ylog": True,
         "series": series("ttft_s", 1e3)},
    ]]  # fmt: skip
    title = (f"{fmt_params(m['parameters']['total'])} random phixtral, {m['dtype']}, prompt {result['prompt']}, "
             f"{result['new_tokens']} new; {common.describe(env)}")  # fmt: skip
    why = common.line_plots(out / "bench_generate.png", panels, title)
    print(f"\nplot: {out / 'bench_generate.png'}" if why is None else f"\nplot not written: {why}")
    print(f"json: {out / 'bench_generate.json'}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    p.add_argument(
        "--dtype", choices=["float32", "float16", "bfloat16"], help="default: float16 on GPU, float32 on CPU"
    )
    p.add_argument("--batches", nargs="+", type=int, default=None)
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens per row")
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--reps", type=int, default=3, help="timed generations per point (median)")
    p.add_argument("--providers", nargs="+", help="run only these providers")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph provider")
    p.add_argument("--attention-upcast", nargs="+", choices=["fp32", "scores"], default=["fp32"],
                   help="time fused and fused_graph in each of these attention modes (model.attention_upcast; "
                   "only fp16 models differ): fp32 (the default) and/or scores, in one run")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="tiny model (the CI smoke run)")
    p.add_argument("--budget-s", type=float, default=150.0, help="stop starting new points after this many seconds")
    p.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's choice; 1 is steadier on a shared machine)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder for bench_generate.json / .png (default: $OUT, else ./out)")
    args = p.parse_args(argv)
    gpu = common.pick_device(args.device).type == "cuda"
    if args.batches is None:
        args.batches = [1, 4] if args.quick else [1, 8, 32]
    if args.prompt is None:
        args.prompt = 16 if args.quick else (256 if gpu else 64)
    if args.new_tokens is None:
        args.new_tokens = 4 if args.quick else (64 if gpu else 32)
    if args.quick:
        args.reps = min(args.reps, 2)
    return args


def main(argv=None) -> dict:
    return common.run_script(parse_args(argv), run_benchmark, report, "bench_generate.json")


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
