"""Shared builders for kernel tests: random MoE layers, routings with chosen shapes, the dtype-aware tolerance, a
recorder of the aten ops a call runs (to find host syncs) and a counter of the kernels it launches."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from phixtral_kernels import naive_moe
from phixtral_kernels.reference import gelu_tanh, topk_lowest_index

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Smallest error floor per dtype, on outputs of order 1.
ERROR_FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
if DEVICE == "cuda":
    ERROR_FLOOR[torch.float32] = 1e-4  # fp32 tl.dot runs as ieee FMA, summed in another order than cuBLAS


def moe_layer(T, D, F, E, dtype=torch.float32, *, device=DEVICE, seed=0, gate=None):
    """Random x [T, D] and MoE weights scaled so every intermediate is of order 1."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    x = rand(T, D)
    gate_weight = rand(E, D) if gate is None else gate.to(device=device, dtype=dtype)
    w1, b1 = rand(E, F, D, scale=D**-0.5), rand(E, F, scale=0.1)
    w2, b2 = rand(E, D, F, scale=F**-0.5), rand(E, D, scale=0.1)
    return x, gate_weight, w1, b1, w2, b2


def reference_moe(x, gate_weight, w1, b1, w2, b2, top_k, *, dtype=torch.float64, device="cpu", topk_ids=None):
    """The MoE computed in `dtype` on `device` (fp64 on the CPU by default), expert by expert.

    Routed on the logits of the test dtype, as every backend routes: near-equal logits may order differently once
    rounded.
    topk_ids [T, top_k]: route on these experts instead (the kernel's own picks, see `assert_top_k_up_to_ties`), with
    the softmax over this reference's logits at those experts.
    """
    logits = (x @ gate_weight.t()).to(device, dtype)
    if topk_ids is None:
        values, experts = topk_lowest_index(logits, top_k)  # [T, top_k]
    else:
        experts = topk_ids.to(device).long()
        values = logits.gather(1, experts)
    weights = torch.softmax(values, dim=-1)
    x, w1, b1, w2, b2 = (t.to(device, dtype) for t in (x, w1, b1, w2, b2))
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        tokens, picks = torch.where(experts == e)
        h = gelu_tanh(torch.addmm(b1[e], x[tokens], w1[e].t()))
        out.index_add_(0, tokens, weights[tokens, picks, None] * torch.addmm(b2[e], h, w2[e].t()))
    return out


def assert_top_k_up_to_ties(topk_ids, x, gate_weight):
    """The kernel's picks are a top-k of the fp64 logits but for near-ties: every picked expert's logit is at least
    every other expert's, less a tolerance of a few roundings of x's dtype at the row's largest logit.

    The fused decode routing sums its logits with tl.dot in 256-wide chunks, the prefill chain and the references with
    a torch matmul (cuBLAS on a GPU): rounded to x's dtype, logits within an ulp of each other may order differently,
    so tests compare on the kernel's own picks (`reference_moe(..., topk_ids=)`) and check here that they are a top-k.
    """
    logits = (x.double() @ gate_weight.double().t()).cpu()  # [T, E]
    ids = topk_ids.cpu().long()
    picked = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, ids, True)
    tol = 4 * torch.finfo(x.dtype).eps * logits.abs().amax(1) + 1e-6  # [T]
    lowest_picked = logits.masked_fill(~picked, float("inf")).amin(1)
    highest_other = logits.masked_fill(picked, float("-inf")).amax(1)
    bad = torch.nonzero(lowest_picked < highest_other - tol).flatten().tolist()
    assert not bad, (
        f"tokens {bad[:8]} pick experts {ids[bad[:8]].tolist()} below others (logits {logits[bad[:8]].tolist()})"
    )
    assert all(len(set(row)) == len(row) for row in ids.tolist()), "an expert picked twice by one token"


def assert_close_to_reference(out, x, gate_weight, w1, b1, w2, b2, top_k, *, routing=None):
    """Error of `out` <= 2x the error of the naive loop run in the same dtype, plus the dtype's floor.

    routing: the RoutingMap the kernels ran on. Its picks are checked to be a top-k up to near-ties
    (`assert_top_k_up_to_ties`) and both the fp64 reference and, in place of the naive loop, the same reference in the
    test dtype route on them: near-tied logits rounded by another summation cannot make the comparison flake.
    """
    ids = None if routing is None else routing.topk_ids
    if ids is not None:
        assert_top_k_up_to_ties(ids, x, gate_weight)
    ref = reference_moe(x, gate_weight, w1, b1, w2, b2, top_k, topk_ids=ids)
    assert out.shape == ref.shape and out.dtype == x.dtype
    err = (out.double().cpu() - ref).abs().max().item() if out.numel() else 0.0
    if x.dtype == torch.float32 and DEVICE == "cpu":
        naive_err = 0.0
    else:
        if ids is None:
            naive = naive_moe(x, gate_weight, w1, b1, w2, b2, top_k)
        else:
            naive = reference_moe(x, gate_weight, w1, b1, w2, b2, top_k, dtype=x.dtype, device=x.device, topk_ids=ids)
        naive_err = (naive.double().cpu() - ref).abs().max().item() if out.numel() else 0.0
    bound = 2 * naive_err + ERROR_FLOOR[x.dtype]
    assert err <= bound, f"max error {err:.3g} > bound {bound:.3g} (naive loop in {x.dtype}: {naive_err:.3g})"


class RecordOps(TorchDispatchMode):
    """Names of the aten ops run; indexing with a boolean mask is recorded as "bool_index"."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("index", "index_put", "index_put_") and len(args) > 1:
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
                name = "bool_index"
        self.ops.add(name)
        return func(*args, **(kwargs or {}))


# aten ops that read device data on the host (.item(), boolean-mask indexing, data-dependent shapes). `.tolist()`
# reads the data below the dispatcher, so no mode sees it: the GPU tier's CUDA-graph capture covers it.
HOST_SYNC_OPS = {
    "_local_scalar_dense",
    "bool_index",
    "nonzero",
    "masked_select",
    "masked_scatter",
    "unique",
    "_unique2",
    "bincount",
}


def assert_same_routing(a, b):
    """Integer outputs exactly; rows past expert_offsets[E] are unspecified."""
    assert torch.equal(a.topk_ids, b.topk_ids)
    torch.testing.assert_close(a.topk_weights, b.topk_weights, rtol=1e-6, atol=1e-6)
    assert torch.equal(a.expert_offsets.cpu(), b.expert_offsets.cpu())
    rows = int(b.expert_offsets[-1])
    assert torch.equal(a.sorted_token_ids[:rows].cpu(), b.sorted_token_ids[:rows].cpu())


# aten ops that launch no device kernel: allocations without a fill, and views.
NO_KERNEL_OPS = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view", "_unsafe_view", "_reshape_alias",
    "t", "transpose", "permute", "unsqueeze", "squeeze", "select", "slice", "as_strided", "expand", "alias", "detach",
    "split", "unbind", "lift_fresh",
}  # fmt: skip


class CountLaunches(TorchDispatchMode):
    """Device kernels a call launches, by name in order: every Triton kernel of phixtral_kernels (counted at
    `kernel[grid](...)`, whatever runs it: the GPU or the interpreter) and every aten op outside NO_KERNEL_OPS
    (torch.zeros, fill_, copy_ and matmuls each launch one on a GPU; torch.empty and views none). The aten ops the
    interpreter runs inside a Triton launch are its own machinery, not counted."""

    def __init__(self):
        super().__init__()
        self.launches = []
        self._inside = 0
        self._patches = []

    def __enter__(self):
        from unittest import mock

        from phixtral_kernels.launches import KERNEL_MODULES  # every kernel the launchers call, by module

        self._patches = [
            mock.patch.object(module, name, _Counted(name, getattr(module, name), self))
            for name, module in KERNEL_MODULES.items()
        ]
        for p in self._patches:
            p.start()
        return super().__enter__()

    def __exit__(self, *exc):
        for p in self._patches:
            p.stop()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self._inside and name not in NO_KERNEL_OPS:
            self.launches.append(name)
        return func(*args, **(kwargs or {}))


class _Counted:
    """A Triton kernel that logs its launches to a CountLaunches."""

    def __init__(self, name, kernel, counter):
        self.name, self.kernel, self.counter = name.strip("_"), kernel, counter

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.counter.launches.append(self.name)
            self.counter._inside += 1
            try:
                return launch(*args, **kwargs)
            finally:
                self.counter._inside -= 1

        return run
