"""One phixtral MoE layer: the fused kernels against the naive loop, the PyTorch peers and the device's floor.

    python benchmarks/bench_moe.py [--out DIR]          # GPU: phixtral-4x2_8 shapes, bf16 and fp16; CPU: reduced shapes

GPU: D=2560, F=10240, E=4, top_k=2 (phixtral-4x2_8), T = 1 ... 16384, bf16 then fp16.
CPU: the phixtral shape is too slow for many T, so D=1024, F=4096, E=4, top_k=2 and T = 1, 8, 64, 512 in fp32 (one
     expert is 33.6 MB, so even T=1 streams weights from memory rather than from a 32 MB L3). There the fused provider
     is backend="torch" (the sorted pipeline in PyTorch): the Triton kernels would run in the interpreter, a test tool,
     not something to time.

Providers, each checked against an fp32 reference (‖out - ref‖ / ‖ref‖, routed on the same logits) before it is timed:
    fused          GPU: fused_moe(backend="triton") replayed from a CUDA graph (the path has no host sync; a model's
                   decode step runs this way). CPU: fused_moe(backend="torch").
    fused_heuristic  GPU, when phixtral_kernels/configs has a tuned table for this GPU (benchmarks/tune_moe.py): "fused"
                   with the heuristic's GEMM configs instead of the table's (gemm_configs.source("heuristic")), so one
                   run compares tuned against untuned. "fused" and "fused_eager" use the table.
    fused_eager    GPU: the same kernels launched from Python each call.
    fused_legacy   GPU, T <= 16: the launch chain the decode chain replaced (router matmul, top-k, align, GEMM 1,
                   GEMM 2 with K-split, combine: 6 launches, grids over every tile of the padded map), replayed from a
                   CUDA graph: `fused` against it is what the decode chain (3 launches) saves. Above T = 16 the two
                   chains are the same but for the grids.
    torch          GPU: fused_moe(backend="torch"); it reads the expert counts on the host.
    naive          naive_moe, the original phixtral loop (boolean masks, host syncs): the baseline of "x naive".
    gather_einsum  gpt-fast style: gather the top_k experts' weights for every token, then einsum. Eager, so the gather
                   is a real copy of T * top_k experts' weights: run only where that fits --gather-cap-gb.
    grouped_mm     torch._grouped_mm over expert-sorted rows (CUTLASS on sm_90), bias and GELU as separate ops; only
                   where the torch build has it and a small trial call passes. GPU: replayed from a CUDA graph when it
                   captures.

Floor per (dtype, T) = max(bytes / copy bandwidth, flops / matmul rate), the two ceilings measured at the start:
    bytes = weights of the experts that the routing of these very inputs hits (counted, not the min(E, T*top_k) bound)
            + x read + out written;
    flops = 4 * T * top_k * D * F (two GEMMs per token slot; router and GELU not counted).
"% floor" = floor / median time (100% = at the floor). "GB/s" = weight bytes touched / median time.
Prints a markdown table per dtype, writes bench_moe.png and bench_moe.json, and prints the JSON as the last line.
"""

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing the package

import common  # noqa: E402

from phixtral_kernels import fused_moe, gelu_tanh, gemm_configs, naive_moe, topk_softmax_torch  # noqa: E402
from phixtral_kernels.moe_triton import DECODE_MAX_TOKENS, triton_moe_forward  # noqa: E402

GPU_SHAPE = dict(D=2560, F=10240, E=4, top_k=2)
CPU_SHAPE = dict(D=1024, F=4096, E=4, top_k=2)  # 4 experts = 134 MB in fp32: larger than the L3 of a server CPU
QUICK_SHAPE = dict(D=128, F=256, E=4, top_k=2)
GPU_TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384]
CPU_TOKENS = [1, 8, 64, 512]
QUICK_TOKENS = [1, 16]
# ‖out - ref‖ / ‖ref‖ allowed per dtype: bf16 keeps 8 bits, so one rounding of h and one of out give ~4e-3.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


# --- inputs and reference --------------------------------------------------------------------------------------------
@dataclass
class Layer:
    """x [T_max, D] and one MoE layer's weights, all in one dtype on one device; fp32 copies for the reference."""

    x: torch.Tensor
    gate: torch.Tensor  # [E, D]
    w1: torch.Tensor  # [E, F, D]
    b1: torch.Tensor  # [E, F]
    w2: torch.Tensor  # [E, D, F]
    b2: torch.Tensor  # [E, D]
    top_k: int

    @property
    def weights(self):
        return self.gate, self.w1, self.b1, self.w2, self.b2

    def expert_bytes(self) -> int:
        """Bytes of one expert: fc1 + b1 + fc2 + b2."""
        return sum(t[0].numel() * t.element_size() for t in (self.w1, self.b1, self.w2, self.b2))


def make_layer(T: int, D: int, F: int, E: int, top_k: int, dtype, device, seed: int = 0) -> Layer:
    """Random inputs scaled so every intermediate is of order 1; drawn on the device (no 400 MB host copy)."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    return Layer(rand(T, D), rand(E, D), rand(E, F, D, scale=D**-0.5), rand(E, F, scale=0.1),
                 rand(E, D, F, scale=F**-0.5), rand(E, D, scale=0.1), top_k)  # fmt: skip


def reference_moe(x, gate, w1, b1, w2, b2, top_k) -> torch.Tensor:
    """The layer in fp32, routed on the logits computed in x's dtype (as every provider routes). -> [T, D] fp32."""
    weights, ids = topk_softmax_torch(x @ gate.t(), top_k)  # [T, top_k] fp32, int32
    x32 = x.float()
    out = torch.zeros_like(x32)
    for e in range(w1.shape[0]):
        tokens, slots = (ids == e).nonzero(as_tuple=True)
        if tokens.numel():
            h = gelu_tanh(torch.addmm(b1[e].float(), x32[tokens], w1[e].float().t()))
            y = torch.addmm(b2[e].float(), h, w2[e].float().t())
            out.index_add_(0, tokens, weights[tokens, slots, None] * y)
    return out


def experts_hit(x, gate, top_k: int) -> int:
    """Distinct experts the routing of x picks."""
    _, ids = topk_softmax_torch(x @ gate.t(), top_k)
    return int(torch.unique(ids).numel())


# --- the peers -------------------------------------------------------------------------------------------------------
def gather_einsum_moe(x, gate, w1, b1, w2, b2, top_k):
    """gpt-fast's MoE (mixtral-moe/model.py), with phi-2's biases and tanh GELU: gather each token's experts, einsum."""
    weights, ids = topk_softmax_torch(x @ gate.t(), top_k)
    ids = ids.long()  # [T, top_k]
    h = gelu_tanh(torch.einsum("td,tkfd->tkf", x, w1[ids]) + b1[ids])  # w1[ids]: [T, top_k, F, D], a real copy
    y = torch.einsum("tkf,tkdf->tkd", h, w2[ids]) + b2[ids]  # [T, top_k, D]
    return torch.einsum("tkd,tk->td", y, weights.to(x.dtype))


def grouped_mm_moe(x, gate, w1, b1, w2, b2, top_k):
    """torch._grouped_mm on rows sorted by expert; no host sync (counts by scatter_add, not bincount)."""
    T, D = x.shape
    E = w1.shape[0]
    weights, ids = topk_softmax_torch(x @ gate.t(), top_k)
    flat = ids.reshape(-1).long()  # slot -> expert
    order = torch.sort(flat, stable=True).indices  # sorted row -> slot
    ones = torch.ones_like(flat, dtype=torch.int32)
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).scatter_add_(0, flat, ones)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)  # end row of each expert's group
    expert_of_row = flat[order]
    # w [E, N, K] -> [E, K, N] view, column-major per group: the layout the CUTLASS kernel takes without a copy.
    h = gelu_tanh(torch._grouped_mm(x[order // top_k], w1.transpose(1, 2), offs=offs) + b1[expert_of_row])  # [S, F]
    y = torch._grouped_mm(h, w2.transpose(1, 2), offs=offs) + b2[expert_of_row]  # [S, D]
    y_slots = torch.empty_like(y)
    y_slots[order] = y  # back to slot order
    return (y_slots.view(T, top_k, D).float() * weights[..., None]).sum(1).to(x.dtype)


def legacy_chain_moe(x, gate, w1, b1, w2, b2, top_k):
    """fused_moe's Triton forward through the six-launch chain that the decode chain replaced (PHIXTRAL_MOE_DECODE_PATH=
    legacy), for timing the two against each other."""
    return triton_moe_forward(x, gate, w1, b1, w2, b2, top_k, path="legacy")[0]


def grouped_mm_unavailable(dtype, device) -> str | None:
    """Why torch._grouped_mm cannot serve here, or None. Its signature and dtype support changed across torch
    versions."""
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    try:
        a = torch.randn(32, 64, device=device).to(dtype)
        b = torch.randn(2, 32, 64, device=device).to(dtype)
        offs = torch.tensor([16, 32], dtype=torch.int32, device=device)
        out = torch._grouped_mm(a, b.transpose(1, 2), offs=offs)
        ref = torch.cat([a[:16].float() @ b[0].float().t(), a[16:].float() @ b[1].float().t()])
        check = common.rel_error(out, ref, TOLERANCE[dtype])
        if not check.ok:
            return f"torch._grouped_mm trial call gave rel. error {check.rel_err:.3g}"
    except Exception as exc:  # noqa: BLE001 -- any failure means "not usable on this build"
        return f"torch._grouped_mm trial call failed: {common.first_line(exc)}"
    return None


OWN_PROVIDERS = ("fused", "fused_heuristic", "fused_eager", "fused_legacy", "torch", "naive")


@dataclass
class Provider:
    name: str
    fn: object  # (x, gate, w1, b1, w2, b2, top_k) -> out [T, D]
    graph: bool  # capture in a CUDA graph on GPUs
    label: str
    max_tokens: int | None = None  # skip above this T (memory)


def tuned_table(device) -> str | None:
    """The tuned-config table fused_moe reads on this device (its path), or None: no GPU, no table for it, or
    PHIXTRAL_MOE_CONFIGS=heuristic."""
    if device.type != "cuda" or gemm_configs.current_source() == "heuristic":
        return None
    source = gemm_configs.current_source()
    path = gemm_configs.table_path(torch.cuda.get_device_name(device)) if source == "tuned" else Path(source)
    return str(path) if gemm_configs.load_table(path) is not None else None


def providers(device, dtype, layer: Layer, gather_cap_bytes: float) -> tuple[list[Provider], dict]:
    """The providers for this device and dtype, and {name: reason} for those that cannot run here."""
    gpu = device.type == "cuda"
    fused_backend = "triton" if gpu else "torch"
    table = tuned_table(device)
    skipped = {}

    def fused(backend):
        return lambda x, *w: fused_moe(x, *w, backend=backend)

    def heuristic(x, *w):
        with gemm_configs.source("heuristic"):  # the configs are picked at capture: the graph keeps them
            return fused_moe(x, *w, backend="triton")

    tuned = f", tuned configs ({Path(table).name})" if table else ""
    out = [
        Provider(
            "fused", fused(fused_backend), gpu, f"fused_moe[{fused_backend}]" + (" CUDA graph" if gpu else "") + tuned
        )
    ]
    if gpu and table:
        out.append(Provider("fused_heuristic", heuristic, True, "fused_moe[triton] CUDA graph, heuristic configs"))
    elif gpu:
        skipped["fused_heuristic"] = (
            f"no tuned table for {torch.cuda.get_device_name(device)}: fused runs the heuristic configs"
        )
    if gpu:
        out.append(Provider("fused_eager", fused("triton"), False, "fused_moe[triton] eager" + tuned))
        out.append(Provider("fused_legacy", legacy_chain_moe, True, "fused_moe[triton] legacy chain, CUDA graph",
                            max_tokens=DECODE_MAX_TOKENS))  # fmt: skip
    out.append(Provider("naive", naive_moe, False, "naive_moe (original loop)"))
    if gpu:
        out.append(Provider("torch", fused("torch"), False, "fused_moe[torch] eager"))
    slot_bytes = layer.expert_bytes()  # gather_einsum copies one expert per token slot
    out.append(Provider("gather_einsum", gather_einsum_moe, gpu, "gather + einsum (gpt-fast)",
                        max_tokens=int(gather_cap_bytes // (layer.top_k * slot_bytes))))  # fmt: skip
    reason = grouped_mm_unavailable(dtype, device)
    if reason is None:
        out.append(Provider("grouped_mm", grouped_mm_moe, gpu, "torch._grouped_mm"))
    else:
        skipped["grouped_mm"] = reason
    return out, skipped


def build(provider: Provider, x, layer: Layer):
    """-> (run() -> out, mode): the call that is timed, built outside the timed region (graph capture included)."""
    args = (x, *layer.weights, layer.top_k)

    def call():
        return provider.fn(*args)

    if provider.graph:
        try:
            return common.cuda_graph(call), "graph"
        except Exception as exc:  # noqa: BLE001 -- a peer that syncs the host cannot be captured; time it eagerly
            torch.cuda.synchronize()
            return call, f"eager (capture failed: {type(exc).__name__})"
    return call, "eager"


# --- the run ---------------------------------------------------------------------------------------------------------
def measure_one(provider, layer, T, ref, device, dtype, rep_budget_s, floor_s=None):
    """Check, then time one provider at one T. -> dict with the timing, or with "skipped"."""
    x = layer.x[:T]
    run, mode = build(provider, x, layer)
    if mode == "graph":
        run().fill_(float("nan"))  # poison the static output: the check then proves every element was written
    check = common.rel_error(run(), ref, TOLERANCE[dtype])
    row = {"provider": provider.name, "mode": mode, "rel_err": check.rel_err, "tol": check.tol, "ok": check.ok}
    if not check.ok:
        row["skipped"] = f"failed the check: rel. error {check.rel_err:.3g} > {check.tol:g}" + (
            "" if check.finite else " (NaN/Inf)"
        )
        return row
    t, rounds, note = common.time_checked(run, device, budget_s=rep_budget_s, floor_s=floor_s)
    row.update(median_s=t.median_s, p25_s=t.p25_s, p75_s=t.p75_s, min_s=t.min_s, reps=t.reps, spread=t.spread,
               rounds=rounds)  # fmt: skip
    if note:
        row["note"] = note
        print(f"warning: {provider.name} at T={T}: {note}", file=sys.stderr)
    return row


def run_benchmark(args) -> dict:
    device = common.pick_device(args.device)
    gpu = device.type == "cuda"
    shape = QUICK_SHAPE if args.quick else (GPU_SHAPE if gpu else CPU_SHAPE)
    if args.shape:
        shape = dict(zip(("D", "F", "E", "top_k"), map(int, args.shape.split(","))))
    tokens = args.tokens or (QUICK_TOKENS if args.quick else (GPU_TOKENS if gpu else CPU_TOKENS))
    dtypes = [getattr(torch, d) for d in (args.dtypes or (["bfloat16", "float16"] if gpu else ["float32"]))]
    env = common.environment(device)
    common.warn_if_interpreted(env)
    print(f"# MoE layer benchmark: {common.describe(env)}")
    print(f"# shape D={shape['D']} F={shape['F']} E={shape['E']} top_k={shape['top_k']}; T in {tokens}; "
          f"dtypes {[str(d).replace('torch.', '') for d in dtypes]}"
          + ("" if gpu else " (CPU: reduced shape)"))  # fmt: skip
    ceilings = common.measure_ceilings(device, quick=args.quick)
    print(f"# ceilings: copy {ceilings['copy_gbps']:.1f} GB/s (read + write), {ceilings['matmul_dtype']} matmul "
          f"{ceilings['matmul_tflops']:.2f} TFLOP/s ({'x'.join(map(str, ceilings['matmul_shape']))})")  # fmt: skip
    deadline = time.monotonic() + args.budget_s
    rows, notes = [], []
    lost = None  # why CUDA can no longer run anything in this process
    D, F, E, top_k = shape["D"], shape["F"], shape["E"], shape["top_k"]
    for dtype in dtypes:
        if lost:
            break
        dname = str(dtype).replace("torch.", "")
        layer = make_layer(max(tokens), D, F, E, top_k, dtype, device, seed=args.seed)
        plist, skipped = providers(device, dtype, layer, args.gather_cap_gb * 1e9)
        if args.providers:
            plist = [p for p in plist if p.name in args.providers]
        notes += [f"{dname}: {name} skipped: {why}" for name, why in skipped.items()]
        # T -> (x, its fp32 reference or None until a provider is timed, the row fields shared by providers)
        points = {}
        for T in tokens:
            x = layer.x[:T]
            hit = experts_hit(x, layer.gate, top_k)
            weight_bytes = hit * layer.expert_bytes()
            nbytes = weight_bytes + 2 * x.numel() * x.element_size()
            flops = 4.0 * T * top_k * D * F
            floor = common.floor_s(nbytes, flops, ceilings)
            bound = "memory" if floor == common.floor_s(nbytes, 0, ceilings) else "compute"
            points[T] = [x, None, {"dtype": dname, "T": T, "experts_hit": hit, "weight_bytes": weight_bytes,
                                   "flops": flops, "floor_s": floor, "floor_bound": bound}]  # fmt: skip
        # Provider by provider (fused first), so that a peer that breaks the CUDA context cannot cost the fused rows.
        for p in plist:
            for T in tokens:
                x, ref, base = points[T]
                row = dict(base, provider=p.name, label=p.label)
                if p.max_tokens is not None and T > p.max_tokens:
                    row["skipped"] = f"T*top_k gathered experts exceed --gather-cap-gb={args.gather_cap_gb:g}"
                elif time.monotonic() > deadline:
                    row["skipped"] = f"time budget (--budget-s={args.budget_s:g}) spent"
                elif lost:
                    row["skipped"] = lost
                else:
                    try:
                        if ref is None:
                            ref = points[T][1] = reference_moe(x, *layer.weights, top_k)
                        row.update(measure_one(p, layer, T, ref, device, dtype, args.rep_budget_s, base["floor_s"]))
                    except Exception as exc:  # noqa: BLE001 -- report the failure in the table, go on with the others
                        row.update(skipped=f"raised {common.first_line(exc)}", error=True)
                        if gpu:
                            try:
                                torch.cuda.synchronize()
                            except Exception as sticky:  # noqa: BLE001 -- e.g. an illegal address poisons the context
                                lost = f"CUDA context lost after {dname} T={T} {p.name}: {common.first_line(sticky)}"
                if "median_s" in row:
                    m = row["median_s"]
                    row.update(tflops=base["flops"] / m / 1e12, weight_gbps=base["weight_bytes"] / m / 1e9,
                               pct_floor=100 * base["floor_s"] / m)  # fmt: skip
                rows.append(row)
                if gpu and not lost:
                    torch.cuda.empty_cache()
            mine = [r for r in rows if r["dtype"] == dname and r["provider"] == p.name]
            timed = sum("median_s" in r for r in mine)
            print(f"#   {dname} {p.name}: {timed} of {len(mine)} points timed "
                  f"({time.monotonic() - deadline + args.budget_s:.0f} s)", flush=True)  # fmt: skip
        for T in tokens:
            here = [r for r in rows if r["dtype"] == dname and r["T"] == T]
            naive = next((r.get("median_s") for r in here if r["provider"] == "naive"), None)
            for r in here:
                if naive and "median_s" in r:
                    r["speedup_vs_naive"] = naive / r["median_s"]
        del layer, points
        if gpu and not lost:
            torch.cuda.empty_cache()
    # Failures that make the run not ok: any failed check, and errors of this project's own paths (not of the peers).
    failed = [r for r in rows if r.get("ok") is False or (r.get("error") and r["provider"] in OWN_PROVIDERS)]
    return {
        "bench": "moe",
        "env": env,
        "shape": shape,
        "tokens": tokens,
        "ceilings": ceilings,
        "fused_backend": "triton" if gpu else "torch",
        "tuned_table": tuned_table(device),
        "floor_note": "bytes = experts hit by the routing of these inputs (counted) + x + out; flops = 4*T*top_k*D*F",
        "notes": notes + ([lost] if lost else []),
        "rows": rows,
        "ok": not failed,
        "failed_checks": [f"{r['dtype']} T={r['T']} {r['provider']}: {r.get('skipped')}" for r in failed],
    }


# --- output ----------------------------------------------------------------------------------------------------------
COLUMNS = [
    ("T", "T"), ("provider", "provider"), ("mode", "mode"), ("median_s", "median"), ("spread", "IQR/med"),
    ("tflops", "TFLOP/s"), ("weight_gbps", "GB/s (weights)"), ("experts_hit", "experts"), ("floor_s", "floor"),
    ("pct_floor", "% floor"), ("speedup_vs_naive", "x naive"), ("rel_err", "rel err"), ("note", "note"),
]  # fmt: skip
FORMATS = {
    "median_s": common.fmt_time,
    "floor_s": common.fmt_time,
    "spread": lambda v: "-" if v is None else f"{100 * v:.1f}%",
    "pct_floor": lambda v: "-" if v is None else f"{v:.1f}%",
    "speedup_vs_naive": lambda v: "-" if v is None else f"{v:.2f}x",
    "rel_err": lambda v: "-" if v is None else f"{v:.1e}",
}


def report(result: dict, out: Path) -> None:
    env = result["env"]
    order = {name: i for i, name in enumerate(dict.fromkeys(r["provider"] for r in result["rows"]))}
    for dname in dict.fromkeys(r["dtype"] for r in result["rows"]):
        rows = sorted((r for r in result["rows"] if r["dtype"] == dname), key=lambda r: (r["T"], order[r["provider"]]))
        s = result["shape"]
        print(f"\n## MoE layer, {dname}, D={s['D']} F={s['F']} E={s['E']} top_k={s['top_k']}: {common.describe(env)}")
        print(f"ceilings: copy {result['ceilings']['copy_gbps']:.1f} GB/s, "
              f"matmul {result['ceilings']['matmul_tflops']:.2f} TFLOP/s; "
              f"fused = fused_moe[{result['fused_backend']}]\n")  # fmt: skip
        print(common.markdown_table([r for r in rows if "median_s" in r], COLUMNS, FORMATS))
        for r in rows:
            if "median_s" not in r:
                print(f"- T={r['T']} {r['provider']}: not timed: {r.get('skipped')}")
    for note in result["notes"]:
        print(f"- {note}")
    # Plot: time and % of floor against T, one line per provider, one column per dtype.
    panels = [[], []]
    for dname in dict.fromkeys(r["dtype"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["dtype"] == dname]
        names = list(dict.fromkeys(r["provider"] for r in rows))
        series_t, series_p = {}, {}
        for name in names:
            pts = [r for r in rows if r["provider"] == name]
            name = pts[0]["label"]
            series_t[name] = ([r["T"] for r in pts], [1e3 * r["median_s"] if "median_s" in r else None for r in pts])
            series_p[name] = ([r["T"] for r in pts], [r.get("pct_floor") for r in pts])
        floors = {r["T"]: 1e3 * r["floor_s"] for r in rows}
        panels[0].append({"title": f"MoE layer time, {dname}", "xlabel": "tokens T", "ylabel": "ms (median)",
                          "xlog": True, "ylog": True, "series": series_t,
                          "ref": (list(floors), list(floors.values()), "floor")})  # fmt: skip
        panels[1].append({"title": f"% of floor, {dname}", "xlabel": "tokens T", "ylabel": "% of floor", "xlog": True,
                          "series": series_p})  # fmt: skip
    s = result["shape"]
    why = common.line_plots(out / "bench_moe.png", panels,
                            f"D={s['D']} F={s['F']} E={s['E']} top_k={s['top_k']}; {common.describe(env)}")  # fmt: skip
    print(f"\nplot: {out / 'bench_moe.png'}" if why is None else f"\nplot not written: {why}")
    print(f"json: {out / 'bench_moe.json'}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    p.add_argument("--dtypes", nargs="+", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--tokens", nargs="+", type=int, help="values of T")
    p.add_argument("--shape", help="D,F,E,top_k instead of the device's default")
    p.add_argument("--providers", nargs="+", help="run only these providers")
    p.add_argument("--quick", action="store_true", help="tiny shapes (the CI smoke run)")
    p.add_argument("--budget-s", type=float, default=150.0, help="stop timing new points after this many seconds")
    p.add_argument("--rep-budget-s", type=float, default=None, help="seconds of timed calls per point")
    p.add_argument("--gather-cap-gb", type=float, default=None, help="largest gather for gather_einsum (GB)")
    p.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's choice; 1 is steadier on a shared machine)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder for bench_moe.json / .png (default: $OUT, else ./out)")
    args = p.parse_args(argv)
    gpu = common.pick_device(args.device).type == "cuda"
    if args.rep_budget_s is None:
        args.rep_budget_s = 0.02 if args.quick else (0.15 if gpu else 0.4)
    if args.gather_cap_gb is None:
        args.gather_cap_gb = 8.0 if gpu else 1.2
    return args


def main(argv=None) -> dict:
    return common.run_script(parse_args(argv), run_benchmark, report, "bench_moe.json")


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
