"""Tune the grouped GEMMs' tile configs for this GPU at phixtral-4x2_8 shapes; write its table for moe_gemm_configs.

    python benchmarks/tune_moe.py [--dtypes bfloat16 float16] [--tokens 1 4 8 16 64 256 1024 4096 16384]
                                  [--budget-s 150] [--jobs N] [--out DIR] [--no-install] [--if-missing]
    python benchmarks/tune_moe.py --dry-run [--capability 90] [--out DIR]     # any machine, no GPU

GPU: D=2560, F=10240, E=4, top_k=2. Per dtype and token bucket (the bucket's largest T), a short list of candidates per
block_m (`candidates`: today's heuristic first, then a few variations of tile, warps, stages, GROUP_M and split-K; on
Hopper also 128x256x64 tiles with 3 or 4 stages, with and without TMA weight loads), for GEMM 1, GEMM 2 and, in the
buckets where fused_moe takes the decode chain (T <= 16), GEMM 2 summing each token's rows ("2sum", no split-K, timed
with the reset of its pair buffer that the chain's routing kernel does), every candidate fitted to the GPU's shared
memory per block as fused_moe fits its configs (fewer stages on sm_86 / sm_89's 99 KB). Each candidate:
  1. is compiled beforehand, in a pool of processes (Triton's compile holds the GIL): every distinct launch once;
  2. runs GEMM 1 (or GEMM 2) once on outputs poisoned with NaN and is checked against an fp32 torch reference
     (‖out - ref‖ / ‖ref‖ over the rows in use, NaN never passes); a candidate that fails is dropped, not timed;
  3. is timed by triton.testing.do_bench_cudagraph (CUDA events around replays of a graph of many calls, median of 10
     replays, after a warm-up), each call alternating between two copies of the weights so that no call finds the
     previous one's weights in L2 (a decode GEMM reads 105 MB of weights at T=1, more than the H200's 50 MB of L2, but
     the last tiles it read would still be there for the next call).
The bucket's block_m is the one whose best GEMM 1 + best GEMM 2 is fastest. After every bucket the table is written
(phixtral_kernels/configs/<GPU>.json, and DIR/<GPU>.json with --out or $OUT), so a run stopped at --budget-s keeps
what it measured; buckets it never reached stay with the heuristic. Each entry holds the config, its time, the
heuristic's time in the same run and the reference error; the table records the date, GPU, torch, triton, CUDA and git.

--dry-run (no GPU, the Triton interpreter on the CPU): the same per-bucket loop without timing, on a small layer
(D=64, F=128, 16 tokens for every bucket): lists each bucket's candidates for --capability, checks every distinct one
(as the interpreter sees them: warps and stages do not matter there) against the torch reference, and writes the
first passing pair of each bucket (the heuristic's) as a table, DIR/dry-run.json, that the loader must accept.
"""

import argparse
import datetime
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import asdict, replace
from pathlib import Path

if "--dry-run" in sys.argv[1:]:  # the interpreter must be on before the kernels are decorated (at import)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from phixtral_kernels import aot, gemm_configs, moe_routing, shared_memory, topk_softmax_torch  # noqa: E402
from phixtral_kernels.gemm_configs import GemmConfig, heuristic_configs  # noqa: E402
from phixtral_kernels.grouped_gemm import launch_grouped_gemm, pair_buffer  # noqa: E402
from phixtral_kernels.launches import recording  # noqa: E402
from phixtral_kernels.moe_triton import DECODE_MAX_TOKENS  # noqa: E402
from phixtral_kernels.reference import gelu_tanh  # noqa: E402
from phixtral_kernels.routing import RoutingMap  # noqa: E402

SHAPE = dict(D=2560, F=10240, E=4, top_k=2)
DRY_SHAPE = dict(D=64, F=128, E=4, top_k=2)
DRY_TOKENS = 16  # --dry-run: 32 slots, about 8 rows per expert (a 128-row tile per expert, mostly padding)
TOKENS = [1, 4, 8, 16, 64, 256, 1024, 4096, 16384]  # bucket keys: T goes to the first key >= T
# ‖out - ref‖ / ‖ref‖ allowed: GEMM 1 rounds h to the dtype (bf16 keeps 8 bits); GEMM 2 sums in fp32.
TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 2e-2, torch.float32: 1e-4}


# --- the candidates --------------------------------------------------------------------------------------------------
def _cfg(block_m, block_n, block_k, warps=4, stages=4, split_k=1, group_m=8, tma=False) -> GemmConfig:
    return GemmConfig(
        block_m, block_n, block_k, split_k=split_k, group_m=group_m, num_warps=warps, num_stages=stages, tma=tma
    )


def candidates(T: int, capability, top_k: int = 2, E: int = 4, shared_bytes: int | None = None) -> dict:
    """{block_m: {"1": [GEMM 1 configs], "2": [GEMM 2 configs], "2sum": [...]}} for T tokens on a GPU of this capability
    (major, minor); the heuristic's first, in its block_m. "2sum", GEMM 2 summing each token's rows itself (no split-K),
    only where fused_moe takes the decode chain (T <= DECODE_MAX_TOKENS, top_k <= 2). A handful per GEMM: the tuner has
    minutes, not hours. shared_bytes: the GPU's shared memory per block, which every candidate is fitted to (as
    fused_moe fits its configs: fewer stages, then smaller tiles) for the 2-byte dtypes the tuner times."""
    h1, h2, h_sum = _heuristic(T, dict(top_k=top_k, E=E), capability, shared_bytes).values()
    rows = T * top_k / E
    hopper = capability is not None and capability[0] == 9
    out = {}

    def add(block_m, gemm1=(), gemm2=(), gemm2_sum=()):
        lists = out.setdefault(block_m, {"1": [], "2": [], "2sum": []})
        for key, cfgs in (("1", gemm1), ("2", gemm2), ("2sum", gemm2_sum)):
            for c in (_fit(c, capability, shared_bytes) for c in cfgs):
                if c not in lists[key]:
                    lists[key].append(c)

    add(h1.block_m, [h1], [h2])
    if T <= DECODE_MAX_TOKENS and top_k <= 2:
        add(h_sum.block_m, gemm2_sum=[h_sum, _cfg(h_sum.block_m, 64, 128), _cfg(h_sum.block_m, 32, 128),
                                      _cfg(h_sum.block_m, 32, 256, stages=4),
                                      _cfg(h_sum.block_m, 32, 64, stages=8)])  # fmt: skip
    if rows <= 16:  # decode: weight streaming; spread N (and K for GEMM 2) over the SMs
        add(16, [_cfg(16, 32, 128), _cfg(16, 64, 256, stages=3), _cfg(16, 128, 128), _cfg(16, 64, 64, stages=6)],
            [_cfg(16, 64, 128, split_k=s) for s in (2, 8)]
            + [_cfg(16, 32, 128, split_k=4), _cfg(16, 64, 256, stages=3, split_k=4),
               _cfg(16, 128, 128, split_k=8)])  # fmt: skip
    elif rows <= 64:
        for bm in (16, 32, 64):
            add(bm, [_cfg(bm, 64, 128), _cfg(bm, 128, 128)], [_cfg(bm, 64, 128, split_k=s) for s in (1, 2, 4)])
    elif rows < 512:  # 128 rows per expert at T = 256: GEMM 2 has 80 tiles of 128x128, split-K fills the SMs
        add(
            128,
            [_cfg(128, 128, 64, warps=4)],
            [_cfg(128, 128, 64, warps=8, stages=3, split_k=2), _cfg(128, 64, 64, split_k=2)],
        )
        add(64, [_cfg(64, 128, 64), _cfg(64, 64, 64)], [_cfg(64, 128, 64), _cfg(64, 128, 64, split_k=2)])
    else:  # prefill: compute-bound
        add(128, [_cfg(128, 128, 64, warps=8, stages=4)], [_cfg(128, 128, 64, warps=8, stages=4)])
        if hopper:
            big = [_cfg(128, 256, 64, warps=8, stages=s, group_m=16, tma=tma) for s in (3, 4) for tma in (False, True)]
            add(128, big, big)
        if rows < 2048:
            add(128, [], [_cfg(128, 128, 64, warps=8, stages=3, split_k=2)])
    return out


# --- inputs and references -------------------------------------------------------------------------------------------
def make_weights(D, F, E, dtype, device, seed):
    """Random MoE weights scaled so every intermediate is of order 1: (gate, w1, b1, w2, b2)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    return (
        rand(E, D),
        rand(E, F, D, scale=D**-0.5),
        rand(E, F, scale=0.1),
        rand(E, D, F, scale=F**-0.5),
        rand(E, D, scale=0.1),
    )


class Bucket:
    """One T: its routing logits, and the fp32 references of both GEMMs in slot order (independent of block_m).

    memoize (--dry-run): `check` runs each (GEMM, tile shape, split, GROUP_M, TMA) once and answers again from
    `checked`."""

    def __init__(self, x, weights, top_k, memoize: bool = False):
        gate, w1, b1, w2, b2 = weights
        self.x, self.top_k, self.dtype = x, top_k, x.dtype
        self.memoize, self.checked, self._routings = memoize, {}, {}
        self.logits = x @ gate.t()
        topk_w, ids = topk_softmax_torch(self.logits, top_k)  # as the kernels route
        S, F, D = x.shape[0] * top_k, w1.shape[1], w2.shape[1]
        flat = ids.reshape(-1).long()
        self.h_ref = torch.empty(S, F, dtype=torch.float32, device=x.device)  # [S, F] in slot order
        self.y_ref = torch.empty(S, D, dtype=torch.float32, device=x.device)
        for e in range(w1.shape[0]):
            slots = (flat == e).nonzero().squeeze(1)
            if slots.numel():
                h = gelu_tanh(torch.addmm(b1[e].float(), x[slots // top_k].float(), w1[e].float().t()))
                self.h_ref[slots] = h
                y = torch.addmm(b2[e].float(), h.to(x.dtype).float(), w2[e].float().t())  # GEMM 2 reads h in the dtype
                self.y_ref[slots] = y * topk_w.reshape(-1)[slots, None]

    def routing(self, block_m: int):
        """The routing map for block_m, its rows in use and their slots, h in sorted order (GEMM 2's input)."""
        if block_m not in self._routings:
            self._routings[block_m] = self._routing(block_m)
        return self._routings[block_m]

    def _routing(self, block_m: int):
        r = moe_routing(self.logits, self.top_k, block_m)
        used = int(r.expert_offsets[-1])  # one host read per bucket and block_m, outside any timing
        ids = r.sorted_token_ids[:used].long()
        rows = (ids < r.num_slots).nonzero().squeeze(1)
        slots = ids[rows]
        h_sorted = torch.zeros(r.max_rows, self.h_ref.shape[1], dtype=self.dtype, device=self.x.device)
        h_sorted[rows] = self.h_ref[slots].to(self.dtype)
        return r, rows, slots, h_sorted


def _launch_gemm(gemm: str, a, w, bias, out, routing, cfg):
    """One launch as fused_moe makes it. "2sum": out is (out [T, D], its pair buffer), the pair buffer reset to the
    sentinel first, as the decode chain's routing kernel leaves it."""
    if gemm == "1":
        launch_grouped_gemm(
            a,
            w,
            bias,
            out,
            routing,
            cfg,
            gather_a=True,
            scatter_c=False,
            activation="gelu_tanh",
            mul_routing_weight=False,
        )
    elif gemm == "2":
        launch_grouped_gemm(
            a, w, bias, out, routing, cfg, gather_a=False, scatter_c=True, activation="", mul_routing_weight=True
        )
    else:
        c, pair = out
        if pair is not None:
            pair.fill_(-1)
        c = c if pair is not None else c.unsqueeze(0)  # top_k = 1: the slot rows are the token rows
        launch_grouped_gemm(
            a,
            w,
            bias,
            c,
            routing,
            cfg,
            gather_a=False,
            scatter_c=True,
            activation="",
            mul_routing_weight=True,
            pair=pair,
        )


def gemm_output(gemm: str, routing, cfg, F, D, dtype, device):
    if gemm == "1":
        return torch.empty(routing.max_rows, F, dtype=dtype, device=device)
    if gemm == "2":
        return torch.empty(cfg.split_k, routing.num_slots, D, dtype=torch.float32, device=device)
    out = torch.empty(routing.num_tokens, D, dtype=dtype, device=device)
    return out, pair_buffer(out, routing.top_k)


def check(gemm: str, bucket: Bucket, rmap, rows, slots, h_sorted, weights, cfg):
    """Run the candidate once on NaN-poisoned output; -> (rel. error, the buffers for timing)."""
    key = (gemm, replace(cfg, num_warps=4, num_stages=1))  # what the interpreter sees of a config
    if bucket.memoize and key in bucket.checked:
        return bucket.checked[key]
    _, w1, b1, w2, b2 = weights
    F, D = w1.shape[1], w2.shape[1]
    out = gemm_output(gemm, rmap, cfg, F, D, bucket.dtype, bucket.x.device)
    (out[0] if gemm == "2sum" else out).fill_(float("nan"))
    if gemm == "1":
        _launch_gemm("1", bucket.x, w1, b1, out, rmap, cfg)
        got, ref = out[rows].float(), bucket.h_ref[slots]
    elif gemm == "2":
        _launch_gemm("2", h_sorted, w2, b2, out, rmap, cfg)
        got, ref = out.sum(0), bucket.y_ref
    else:
        _launch_gemm("2sum", h_sorted, w2, b2, out, rmap, cfg)
        got, ref = out[0].float(), bucket.y_ref.view(-1, bucket.top_k, D).sum(1)
    result = common.rel_error(got, ref, TOLERANCE[bucket.dtype]), out
    if bucket.memoize:
        bucket.checked[key] = result
    return result


def time_candidate(gemm: str, bucket: Bucket, rmap, h_sorted, weight_sets, cfg, out) -> float:
    """Median seconds per call; calls alternate between the weight copies (no L2 reuse between calls)."""
    import triton.testing

    a = bucket.x if gemm == "1" else h_sorted
    calls = [
        (ws[1], ws[2]) if gemm == "1" else (ws[3], ws[4]) for ws in weight_sets
    ]  # "2sum": its pair buffer reset too

    def run():
        for w, bias in calls:
            _launch_gemm(gemm, a, w, bias, out, rmap, cfg)

    return triton.testing.do_bench_cudagraph(run, rep=10, return_mode="median") * 1e-3 / len(calls)


# --- compile ahead, in processes -------------------------------------------------------------------------------------
def _empty_launch_inputs(T, dtype, cfg, gemm, shape, device):
    """Empty tensors with the shapes, dtypes and strides of one GEMM launch (nothing is read: the launch is
    recorded)."""
    D, F, E, top_k = shape["D"], shape["F"], shape["E"], shape["top_k"]
    S, bm = T * top_k, cfg.block_m
    i32 = dict(dtype=torch.int32, device=device)
    rmap = RoutingMap(torch.empty(T, top_k, device=device), torch.empty(T, top_k, **i32),
                      torch.empty(S + E * (bm - 1), **i32), torch.empty(E + 1, **i32), bm)  # fmt: skip
    if gemm == "1":
        a, w, bias = (
            torch.empty(T, D, dtype=dtype, device=device),
            torch.empty(E, F, D, dtype=dtype, device=device),
            torch.empty(E, F, dtype=dtype, device=device),
        )
    else:  # "2" and "2sum"
        a, w, bias = (
            torch.empty(rmap.max_rows, F, dtype=dtype, device=device),
            torch.empty(E, D, F, dtype=dtype, device=device),
            torch.empty(E, D, dtype=dtype, device=device),
        )
    return a, w, bias, gemm_output(gemm, rmap, cfg, F, D, dtype, device), rmap


def _record(task, warm: bool):
    dtype_name, T, gemm, cfg_fields, shape = task
    cfg = GemmConfig(**cfg_fields)
    a, w, bias, out, rmap = _empty_launch_inputs(T, getattr(torch, dtype_name), cfg, gemm, dict(shape), "cuda")
    with recording(warm=warm) as launches:
        _launch_gemm(gemm, a, w, bias, out, rmap, cfg)
    return launches


def _warm_task(task) -> None:
    _record(task, warm=True)


def compile_all(tasks: list, jobs: int, deadline: float) -> int:
    """Compile each distinct launch of `tasks` into Triton's cache, `jobs` processes at once; stop waiting at the
    deadline (what is left compiles at its first launch). -> compiles done."""
    unique, seen = [], set()
    for task in tasks:
        key = aot.launch_key(_record(task, warm=False)[0])
        if key not in seen:
            seen.add(key)
            unique.append(task)
    print(f"# compiling {len(unique)} distinct launches ({len(tasks)} candidates) in {jobs} processes", flush=True)
    import multiprocessing

    done = 0
    pool = ProcessPoolExecutor(max(1, min(jobs, len(unique))), mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = [pool.submit(_warm_task, t) for t in unique]
        for future in as_completed(futures, timeout=max(1.0, deadline - time.monotonic())):
            future.result()
            done += 1
    except FuturesTimeout:
        print(f"# compile phase cut at its deadline: {done} of {len(unique)} done", flush=True)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return done


# --- the table -------------------------------------------------------------------------------------------------------
def config_fields(cfg: GemmConfig) -> dict:
    return asdict(cfg)


def new_table(gpu: str, shape: dict, conditions: dict) -> dict:
    return {"format": gemm_configs.FORMAT, "gpu": gpu, "shape": dict(shape), "conditions": conditions, "configs": {}}


def write_table(table: dict, paths) -> None:
    text = json.dumps(table, indent=1, sort_keys=False) + "\n"
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)  # a reader never sees half a table


def _put(table, dtype_name, T, gemm, entry):
    table["configs"].setdefault(dtype_name, {"1": {}, "2": {}}).setdefault(gemm, {})[str(T)] = entry


def _heuristic(T, shape, capability, shared_bytes: int | None = None) -> dict:
    """{gemm: the heuristic's config} for T tokens, fitted to shared_bytes as fused_moe fits it: what the tuned entries
    are timed against."""
    h1, h2 = heuristic_configs(T, shape["top_k"], shape["E"], capability)
    h_sum = heuristic_configs(T, shape["top_k"], shape["E"], capability, sum_in_gemm2=True)[1]
    return {gemm: _fit(c, capability, shared_bytes) for gemm, c in (("1", h1), ("2", h2), ("2sum", h_sum))}


def _fit(cfg: GemmConfig, capability, shared_bytes: int | None) -> GemmConfig:
    """cfg as fused_moe would launch it in a 2-byte dtype on a GPU with shared_bytes per block (None: as it is)."""
    return cfg if shared_bytes is None else shared_memory.fit_shared_memory(cfg, shared_bytes, 2, capability)


# --- the run ---------------------------------------------------------------------------------------------------------
def tune_bucket(T, bucket: Bucket, plan_T: dict, weight_sets, heuristic, timer, log):
    """Check (and, with a timer, time) every candidate of one bucket; -> (entries {"1": ..., "2": ..., and "2sum" where
    the bucket has its candidates} or None when no block_m had a passing candidate for both GEMMs, [(gemm, cfg,
    seconds, rel_err)], failures). heuristic: {gemm: the heuristic's config}, for its time in the entries.

    Per block_m, the fastest passing candidate of each GEMM; then the block_m whose GEMM 1 and GEMM 2 are fastest
    together ("2sum" is taken on that block_m). Without a timer (--dry-run) nothing is timed and the first passing
    candidate wins: the heuristic's, where it passes."""
    best, measured, rows, failures = None, {}, [], 0
    for block_m, lists in plan_T.items():
        rmap, used_rows, slots, h_sorted = bucket.routing(block_m)
        picks = {}
        for gemm, cfgs in lists.items():
            for cfg in cfgs:
                try:
                    result, out = check(gemm, bucket, rmap, used_rows, slots, h_sorted, weight_sets[0], cfg)
                    if not result.ok:
                        failures += 1
                        log(f"#   T={T} GEMM {gemm} {_short(cfg)}: FAILED the check, rel. error {result.rel_err:.3g}")
                        continue
                    seconds = timer(gemm, rmap, h_sorted, cfg, out) if timer else 0.0
                except Exception as exc:  # noqa: BLE001 -- a candidate that cannot run is dropped, the others go on
                    failures += 1
                    log(f"#   T={T} GEMM {gemm} {_short(cfg)}: raised {common.first_line(exc)}")
                    if bucket.x.is_cuda:
                        torch.cuda.synchronize()
                    continue
                measured[(gemm, cfg)] = seconds
                rows.append((gemm, cfg, seconds, result.rel_err))
                if gemm not in picks or seconds < picks[gemm][1]:
                    picks[gemm] = (cfg, seconds, result.rel_err)
        if "1" in picks and "2" in picks and (best is None or picks["1"][1] + picks["2"][1] < best[0]):
            best = (picks["1"][1] + picks["2"][1], block_m, picks)
    if best is None:
        return None, rows, failures
    entries = {}
    for gemm, (cfg, seconds, err) in best[2].items():
        h_s = measured.get((gemm, heuristic.get(gemm)))
        entries[gemm] = {"config": config_fields(cfg), "us": round(seconds * 1e6, 2) if timer else None,
                         "heuristic_us": None if h_s is None or not timer else round(h_s * 1e6, 2),
                         "rel_err": float(f"{err:.3g}")}  # fmt: skip
    return entries, rows, failures


def tune(args) -> int:
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    capability = (props.major, props.minor)
    shared = shared_memory.cuda_shared_bytes(torch.cuda.current_device())
    gpu = torch.cuda.get_device_name(device)
    env = common.environment(device)
    conditions = {
        k: env.get(k)
        for k in ("date", "git", "python", "torch", "triton", "cuda", "capability", "sms", "nvidia_smi", "command")
    }
    conditions["budget_s"] = args.budget_s
    shape = SHAPE
    start = time.monotonic()
    deadline = start + args.budget_s
    print(f"# tune_moe: {common.describe(env)}; D={shape['D']} F={shape['F']} E={shape['E']} top_k={shape['top_k']}; "
          f"T buckets {args.tokens}; dtypes {args.dtypes}; budget {args.budget_s:g} s", flush=True)  # fmt: skip
    dtypes = [getattr(torch, d) for d in args.dtypes]
    plan = {T: candidates(T, capability, shape["top_k"], shape["E"], shared) for T in args.tokens}
    tasks = [(str(dt).replace("torch.", ""), T, gemm, config_fields(c), tuple(shape.items()))
             for dt in dtypes for T, per_bm in plan.items() for lists in per_bm.values()
             for gemm, cfgs in lists.items() for c in cfgs]  # fmt: skip
    compile_all(tasks, args.jobs or aot.default_jobs(), start + args.compile_share * args.budget_s)
    print(f"# compiled in {time.monotonic() - start:.0f} s", flush=True)

    paths = [] if args.no_install else [gemm_configs.table_path(gpu)]
    out_dir = args.out or os.environ.get("OUT")
    if out_dir:
        paths.append(Path(out_dir) / f"{gemm_configs.table_name(gpu)}.json")
    table = new_table(gpu, shape, conditions)
    failures, rows = 0, []
    for dt in dtypes:
        dname = str(dt).replace("torch.", "")
        weight_sets = [
            make_weights(shape["D"], shape["F"], shape["E"], dt, device, seed) for seed in (args.seed, args.seed + 1)
        ]
        x_gen = torch.Generator(device=device).manual_seed(args.seed + 7)
        x_all = torch.randn(max(args.tokens), shape["D"], generator=x_gen, device=device).to(dt)
        for T in args.tokens:
            if time.monotonic() > deadline:
                print(
                    f"# {dname} T={T}: not tuned, --budget-s={args.budget_s:g} spent (the heuristic serves it)",
                    flush=True,
                )
                continue
            bucket = Bucket(x_all[:T], weight_sets[0], shape["top_k"])
            heuristic = _heuristic(T, shape, capability, shared)

            def timer(gemm, rmap, h_sorted, cfg, out, bucket=bucket, weight_sets=weight_sets):
                return time_candidate(gemm, bucket, rmap, h_sorted, weight_sets, cfg, out)

            def log(line, dname=dname):
                print(f"{line} [{dname}]", flush=True)

            entries, bucket_rows, bucket_failures = tune_bucket(T, bucket, plan[T], weight_sets, heuristic, timer, log)
            failures += bucket_failures
            rows += [(dname, T, *row) for row in bucket_rows]
            # timer holds the bucket and the weights through its defaults: drop it too, so that both can be freed
            del bucket, timer
            torch.cuda.empty_cache()
            if entries is None:
                print(f"# {dname} T={T}: no candidate passed for both GEMMs; the heuristic serves it", flush=True)
                continue
            for gemm, entry in entries.items():
                _put(table, dname, T, gemm, entry)
            h = [entries[g]["heuristic_us"] for g in "12"]
            summed = f", GEMM 2 summing {entries['2sum']['us']:.1f} us" if "2sum" in entries else ""
            print(f"# {dname} T={T}: block_m {entries['1']['config']['block_m']}, "
                  f"GEMM 1 {entries['1']['us']:.1f} us, GEMM 2 {entries['2']['us']:.1f} us{summed}; "
                  f"heuristic {'-' if None in h else f'{sum(h):.1f} us'} "
                  f"({time.monotonic() - start:.0f} s)", flush=True)  # fmt: skip
            table["conditions"]["seconds"] = round(time.monotonic() - start, 1)
            write_table(table, paths)
        del weight_sets, x_all
        torch.cuda.empty_cache()
    print()
    print(common.markdown_table(
        [dict(dtype=d, T=T, gemm=g, config=_short(c), us=sec * 1e6, err=e) for d, T, g, c, sec, e in rows],
        [("dtype", "dtype"), ("T", "T"), ("gemm", "GEMM"), ("config", "config"), ("us", "us"), ("err", "rel err")],
        {"us": lambda v: f"{v:.1f}", "err": lambda v: f"{v:.1e}"},
    ))  # fmt: skip
    tuned = sum(len(v["1"]) for v in table["configs"].values())
    print(f"\ntune_moe: {tuned} buckets tuned in {time.monotonic() - start:.0f} s, {failures} candidates failed; "
          "table: " + (", ".join(map(str, paths)) or "not written (--no-install and no --out)"))  # fmt: skip
    return 1 if failures or not tuned else 0


def _short(cfg: GemmConfig) -> str:
    s = f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages} g{cfg.group_m}"
    return s + (f" split{cfg.split_k}" if cfg.split_k > 1 else "") + (" tma" if cfg.tma else "")


def dry_run(args) -> int:
    """tune_bucket without timing, on a small layer in the interpreter: every bucket's candidates for --capability
    listed and checked (each distinct one run once: the interpreter ignores warps and stages), the first passing
    pair written as a table that the loader must accept."""
    capability = divmod(args.capability, 10)
    shared = shared_memory.capability_shared_bytes(capability)
    shape = DRY_SHAPE
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    table = new_table(
        f"dry run (sm_{args.capability})", SHAPE, {"date": date, "note": "--dry-run: first passing candidates, untimed"}
    )
    results, failures, count = {}, 0, 0
    start = time.monotonic()
    for dt in [getattr(torch, d) for d in args.dtypes]:
        dname = str(dt).replace("torch.", "")
        weights = make_weights(shape["D"], shape["F"], shape["E"], dt, torch.device("cpu"), args.seed)
        x = torch.randn(DRY_TOKENS, shape["D"], generator=torch.Generator().manual_seed(args.seed + 7)).to(dt)
        bucket = Bucket(
            x, weights, shape["top_k"], memoize=True
        )  # one small T for all buckets: the interpreter pays per program
        for T in args.tokens:
            plan_T = candidates(T, capability, SHAPE["top_k"], SHAPE["E"], shared)
            heuristic = _heuristic(T, SHAPE, capability, shared)

            def log(line, dname=dname):
                print(f"{line} [{dname}]")

            entries, rows, bucket_failures = tune_bucket(T, bucket, plan_T, [weights], heuristic, None, log)
            failures += bucket_failures
            count += sum(len(cfgs) for lists in plan_T.values() for cfgs in lists.values())
            for gemm, cfg, _, err in rows:
                print(f"{dname} T={T} GEMM {gemm} {_short(cfg)}: ok (rel. error {err:.1e})")
            for gemm, entry in (entries or {}).items():
                _put(table, dname, T, gemm, entry)
        results[dname] = len(bucket.checked)
    out = Path(args.out or os.environ.get("OUT") or "out")
    write_table(table, [out / "dry-run.json"])
    loaded = gemm_configs.load_table(out / "dry-run.json")
    ok = loaded is not None and all(None not in configs for _, configs in loaded.buckets.values())
    ok = ok and all(len(keys) == len(args.tokens) for keys, _ in loaded.buckets.values())
    print(f"tune_moe --dry-run: {count} candidates, {sum(results.values())} distinct runs in the interpreter, "
          f"{failures} failed, table {out / 'dry-run.json'} {'loads' if ok else 'DOES NOT LOAD'} "
          f"({time.monotonic() - start:.1f} s)")  # fmt: skip
    return 1 if failures or not ok else 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"], choices=["bfloat16", "float16"])
    p.add_argument("--tokens", nargs="+", type=int, default=TOKENS, help="bucket keys (each bucket's largest T)")
    p.add_argument("--budget-s", type=float, default=150.0, help="stop starting new buckets after this many seconds")
    p.add_argument("--compile-share", type=float, default=0.5, help="share of the budget the compile phase may take")
    p.add_argument("--jobs", type=int, help="compile processes (default: the CPUs)")
    p.add_argument("--out", help="also write the table here (default: $OUT when set)")
    p.add_argument("--no-install", action="store_true", help="do not write phixtral_kernels/configs/<GPU>.json")
    p.add_argument("--if-missing", action="store_true", help="do nothing when this GPU already has a table")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dry-run", action="store_true", help="no GPU: list the candidates and check each in the interpreter"
    )
    p.add_argument(
        "--capability", type=int, default=90, help="--dry-run: the GPU whose candidates to list (80, 90, ...)"
    )
    args = p.parse_args(argv)
    args.tokens = sorted(set(args.tokens))
    if min(args.tokens) < 1:
        p.error("--tokens must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    if not torch.cuda.is_available():
        print("tune_moe: no CUDA GPU visible (--dry-run checks the candidates on the CPU)", file=sys.stderr)
        return 2
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("tune_moe: unset TRITON_INTERPRET: interpreted kernels cannot be timed", file=sys.stderr)
        return 2
    path = gemm_configs.table_path(torch.cuda.get_device_name())
    if args.if_missing and path.exists():
        print(f"tune_moe: {path} exists: nothing to tune (delete it, or run without --if-missing, to tune again)")
        return 0
    return tune(args)


if __name__ == "__main__":
    sys.exit(main())
