"""A lean phi-2 / phixtral decoder: parallel blocks, partial rotary, a static KV cache, the MoE layer from
phixtral_kernels.

What is special about this family:
    - one LayerNorm feeds both attention and the MLP, and both outputs join the residual:
      x = x + attn(ln(x)) + moe(ln(x));
    - rotary embeddings touch only the first rotary_dim dims of each head (32 of 80 for phi-2), NeoX half-split;
    - phi-2's attention scores overflow fp16 in the late layers, so attention runs in fp32 when the model runs in fp16
      (attention_upcast="scores" instead keeps q, k, v in fp16 and pre-scales q so that no fp16 product overflows);
    - every MLP is a MoE layer: a dense checkpoint is one expert with top_k 1, and all layers call `fused_moe`;
    - GPTQ checkpoints keep Wqkv, out_proj, fc1 and fc2 packed (phixtral/quant/modules.py): on a GPU they run through
      the same grouped GEMM, which dequantizes inside its K loop; on a CPU, in bfloat16, through torch's packed int8 /
      int4 kernels (phixtral_kernels.cpu_packed), repacked at load. This file holds the float modules only;
    - backend, attention_upcast and cuda_graph are one RuntimeSettings per model (phixtral/runtime.py), set on the model
      and read by the layers when they run.
Module names keep the phi-msft checkpoint's words (wte, h, ln, mixer.Wqkv, mixer.out_proj, moe.gate, fc1, fc2,
lm_head.ln, lm_head.linear) so that weights.py is a short name map. Shapes: B batch, S new tokens, L cache slots,
D model dim, H heads, hd head dim, V vocab.
"""

import json
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from phixtral_kernels import fused_moe
from phixtral_kernels.graph_ops import expert_linear, fused_moe_triton, is_compiling, moe_by_expert_ops

from .atomic import atomic_folder
from .attention import Attention, KVCache, apply_rotary  # noqa: F401 -- importable from here
from .config import PhixtralConfig
from .quant.modules import QuantizedExpertLinear, QuantizedLinear, quantized_module  # noqa: F401  (their former home)
from .runtime import (
    ATTENTION_UPCAST,  # noqa: F401  (importable from here, its former home)
    RuntimeSettings,
    check_backend_device,
    resolved_backend,
)


class ExpertLinear(nn.Module):
    """E torch Linears stacked for the kernels: weight [E, out, in], bias [E, out]."""

    def __init__(self, num_experts: int, out_features: int, in_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features))
        for e in range(num_experts):  # torch.nn.Linear's init, expert by expert (a no-op on the meta device)
            nn.init.kaiming_uniform_(self.weight[e], a=math.sqrt(5))
            nn.init.uniform_(self.bias[e], -1 / math.sqrt(in_features), 1 / math.sqrt(in_features))

    def weight_for(self, x: torch.Tensor) -> torch.Tensor:
        """The weight as the kernels take it for input x: the stacked tensor (packed modules answer their own form)."""
        return self.weight

    def graph_unavailable_reason(self, x: torch.Tensor, backend: str) -> Optional[str]:
        """Why this stack cannot run in a compiled step: never (float stacks run anywhere)."""
        return None

    def graph_linear(self, x: torch.Tensor, ids: Optional[torch.Tensor]) -> torch.Tensor:
        """x [T, in] -> [T, out], row t through expert ids[t]: a compiled step's way. With ids, one custom op picks the
        experts (phixtral_kernels.graph_ops); ids None (expert 0: a dense layer) is a plain linear in the graph."""
        if ids is None:
            return nn.functional.linear(x, self.weight[0], self.bias[0])
        return expert_linear(x, ids, self.weight, self.bias)

    def graph_weights(self) -> tuple:
        """The stack as fused_moe_triton's plain arguments: (weight, qzeros, scales, g_idx, bits, group_size), bits 0
        for a float stack."""
        return self.weight, None, None, None, 0, 0


class MoE(nn.Module):
    """Router + E experts fc2(gelu_new(fc1(x))), top_k per token; the whole layer is one `fused_moe` call.

    fc1 and fc2 are expert stacks: an ExpertLinear or a packed one (phixtral/quant), each answering `weight_for(x)`."""

    def __init__(self, config: PhixtralConfig, runtime: Optional[RuntimeSettings] = None):
        super().__init__()
        E, D, F_ = config.num_local_experts, config.n_embd, config.n_inner
        self.runtime = runtime if runtime is not None else RuntimeSettings()  # the model's: backend
        self.gate = nn.Linear(D, E, bias=False)
        self.fc1 = ExpertLinear(E, F_, D)  # w1 [E, F, D], b1 [E, F] (or a QuantizedExpertLinear)
        self.fc2 = ExpertLinear(E, D, F_)  # w2 [E, D, F], b2 [E, D] (or a QuantizedExpertLinear)
        self.top_k = config.num_experts_per_tok

    @property
    def backend(self) -> str:
        """The MoE implementation this layer runs: its model's backend."""
        return self.runtime.backend

    def forward(self, x):
        # x [B, S, D] -> [B, S, D]
        if is_compiling():  # a compiled step: the layer as custom ops (phixtral_kernels.graph_ops), no host read
            return self._graph_forward(x.reshape(-1, x.shape[-1])).view(x.shape)
        y = fused_moe(
            x.reshape(-1, x.shape[-1]),  # [T = B * S, D]
            self.gate.weight,
            self.fc1.weight_for(x),
            self.fc1.bias,
            self.fc2.weight_for(x),
            self.fc2.bias,
            self.top_k,
            backend=self.runtime.backend,
        )
        return y.view(x.shape)

    def _graph_forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [T, D] -> [T, D]: the Triton forward as one op where the backend resolves to it (a GPU), else the router and
        # GELU traced around the experts' GEMMs as ops (the torch backend's math).
        if resolved_backend(self.runtime.backend, x.device, x.dtype) == "triton":
            w1, z1, s1, g1, bits1, group1 = self.fc1.graph_weights()
            w2, z2, s2, g2, bits2, group2 = self.fc2.graph_weights()
            return fused_moe_triton(
                x, self.gate.weight, w1, z1, s1, g1, self.fc1.bias, w2, z2, s2, g2, self.fc2.bias, self.top_k,
                [bits1, bits2], [group1, group2],
            )  # fmt: skip
        return moe_by_expert_ops(x, self.gate.weight, self.fc1.graph_linear, self.fc2.graph_linear, self.top_k)


class Block(nn.Module):
    """Parallel residual block: one LayerNorm feeds attention and the MoE, both added to the residual."""

    def __init__(self, config: PhixtralConfig, runtime: Optional[RuntimeSettings] = None):
        super().__init__()
        runtime = runtime if runtime is not None else RuntimeSettings()  # one for both layers of a block built alone
        self.ln = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mixer = Attention(config, runtime)
        self.moe = MoE(config, runtime)

    def forward(self, x, cos, sin, mask, input_pos, cache_row: int = 0):
        h = self.ln(x)
        return self.mixer(h, cos, sin, mask, input_pos, cache_row) + self.moe(h) + x  # summed in the original's order


class Head(nn.Module):
    """Final LayerNorm + output projection (phi-msft's `lm_head.ln` / `lm_head.linear`)."""

    def __init__(self, config: PhixtralConfig):
        super().__init__()
        self.ln = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.linear = nn.Linear(config.n_embd, config.vocab_size)  # with bias, never tied to wte

    def forward(self, x):
        return self.linear(self.ln(x))


class Phixtral(nn.Module):
    """The decoder. `model(input_ids) -> logits [B, S, V]` (fp32); `generate` / `chat` for text (see generate.py).

    Build with `phixtral.from_pretrained(path_or_id)`; `tokenizer` is set there when the checkpoint ships one.
    backend, attention_upcast and cuda_graph live in `runtime` (a phixtral.runtime.RuntimeSettings), which every layer
    that needs one reads when it runs; pass `runtime` to share one already checked (from_pretrained does), else one is
    made with `backend`. Put modules into a model with `set_submodule`, which makes them read this model's settings.
    """

    def __init__(self, config: PhixtralConfig, *, backend: str = "auto", runtime: Optional[RuntimeSettings] = None):
        super().__init__()
        if runtime is not None and backend != "auto":
            raise ValueError("pass backend or runtime, not both")
        self.runtime = runtime if runtime is not None else RuntimeSettings(backend=backend)
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.h = nn.ModuleList(Block(config, self.runtime) for _ in range(config.n_layer))
        self.lm_head = Head(config)
        self.tokenizer = None
        self.eos_token_ids: list[int] = []  # filled by from_pretrained from the tokenizer and the configs
        self.last_generation_stats = None  # a GenerationStats after each generate()
        self._inv_freq = {}  # device -> [rotary_dim / 2] fp32; a plain dict so .half() can never round it
        self.quantization = None  # the format (phixtral.quant, e.g. a GPTQConfig) when some Linears are packed
        self.source = None  # the checkpoint folder from_pretrained read: save_pretrained never writes over it
        self.source_dtype = None  # the float dtype of its files: save_pretrained's default
        self.decode_graphs = (
            None  # the captured decode steps (a decode_graph.DecodeGraphs); they point into the KV cache
        )
        check_backend_device(self.runtime.backend, self.device)

    @classmethod
    def from_pretrained(cls, path_or_id=None, **kwargs) -> "Phixtral":
        """See `phixtral.weights.from_pretrained` (no path: the bundled tiny phixtral)."""
        from .weights import from_pretrained

        return from_pretrained(path_or_id, **kwargs)

    def save_pretrained(self, folder, *, dtype=None, max_shard_bytes: int = 4 * 2**30, overwrite: bool = True,
                        sources=(), extra_files: Optional[dict] = None):  # fmt: skip
        """Write this model (phi-msft layout, sharded safetensors + index + config.json) and its tokenizer to `folder`.

        dtype: None (the dtype of the checkpoint the model was loaded from, else the model's), torch.float16 /
            bfloat16 / float32 or their names ("float16", "bf16", ...).
        The checkpoint is written to a temporary folder next to `folder` that replaces it whole once complete: a failure
        (full disk, Ctrl-C) leaves `folder` as it was, and no file of an earlier checkpoint survives a successful save.
        overwrite: replace an existing checkpoint folder (one with a config.json and no subfolders; any other non-empty
        folder is refused); False refuses every non-empty folder. Arguments are checked before anything is written.
        A generation_config.json carries `eos_token_ids` when the tokenizer and config.json do not name them all.
        sources: folders `folder` may not be, contain or lie inside (what a command read its inputs from); the folder
            the model was loaded from is always one of them, so a save can never replace (or delete files of) its own
            source.
        extra_files: {file name: text} written beside the checkpoint, in the same atomic write (e.g. a training log).
        Returns the shard paths.
        """
        from .checkpoint_writer import check_checkpoint_destination, checkpoint_dtype, write_msft_files
        from .weights import eos_token_ids

        dtype = checkpoint_dtype(dtype)
        if dtype is None and self.source_dtype is not None and self.source_dtype != self.dtype:
            dtype = self.source_dtype
        sources = [*sources, *([self.source] if self.source is not None else [])]
        extra_files = dict(extra_files or {})
        for name in extra_files:
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise ValueError(f"extra_files: {name!r} is not a plain file name")
        check_checkpoint_destination(folder, overwrite=overwrite, sources=sources)
        with atomic_folder(folder, overwrite=overwrite, sources=sources) as tmp:
            for name, text in extra_files.items():
                (tmp / name).write_text(text, encoding="utf-8")
            paths = write_msft_files(tmp, self.state_dict(), self.config, dtype=dtype, max_shard_bytes=max_shard_bytes,
                                     quantization=self.quantization)  # fmt: skip
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(str(tmp))
            if set(self.eos_token_ids) - set(eos_token_ids(tmp, self.config, self.tokenizer)):
                (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": self.eos_token_ids}) + "\n")
        return [Path(folder) / p.name for p in paths]

    @property
    def device(self) -> torch.device:
        return self.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.wte.weight.dtype

    # --- runtime settings (phixtral/runtime.py) ---------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self.runtime.backend

    def set_backend(self, backend: str) -> None:
        """Choose the MoE implementation of every layer: "auto", "triton", "torch" or "naive" (see phixtral_kernels).
        GPTQ-packed dense Linears follow it too ("naive" runs them as "torch" does)."""
        check_backend_device(backend, self.device)
        self.runtime.backend = backend
        self.decode_graphs = None  # captured with the old backend

    @property
    def attention_upcast(self) -> str:
        """How an fp16 model computes attention: "fp32" (q, k, v upcast, the default) or "scores" (fp16 q, k, v, q
        pre-scaled; see Attention.forward). No effect on fp32 and bf16 models."""
        return self.runtime.attention_upcast

    @attention_upcast.setter
    def attention_upcast(self, mode: str) -> None:
        self.runtime.attention_upcast = mode
        self.decode_graphs = None  # captured with the other mode

    @property
    def cuda_graph(self):
        """Whether decode steps replay from CUDA graphs: "auto" (the default), True or False (phixtral/decode_graph.py);
        generate's cuda_graph argument overrides it for one call."""
        return self.runtime.cuda_graph

    @cuda_graph.setter
    def cuda_graph(self, mode) -> None:
        self.runtime.cuda_graph = mode

    @property
    def compile_decode(self):
        """Whether decode steps run compiled by torch.compile: "auto" (the default), True or False
        (phixtral/compiled_decode.py); generate's compile argument overrides it for one call."""
        return self.runtime.compile

    @compile_decode.setter
    def compile_decode(self, mode) -> None:
        self.runtime.compile = mode

    def set_submodule(self, target: str, module: nn.Module, strict: bool = False) -> None:
        """Put `module` at `target` (e.g. "h.0.mixer.Wqkv"), as torch's set_submodule does; the layers inside it read
        this model's runtime settings from then on (a module built alone, or taken from another model, would otherwise
        keep reading the settings it was made with)."""
        parent_name, _, name = target.rpartition(".")
        parent = self.get_submodule(parent_name)
        if strict and not hasattr(parent, name):
            raise AttributeError(f"{parent_name or type(self).__name__} has no attribute {name!r}")
        for layer in module.modules():
            if isinstance(getattr(layer, "runtime", None), RuntimeSettings):
                layer.runtime = self.runtime
        setattr(parent, name, module)
        self.decode_graphs = None  # captured over the module it replaces

    def pack_for_cpu(self) -> None:
        """Repack the packed Linears for torch's CPU int8 / int4 kernels now (a bfloat16 model on the CPU) rather than
        at their first call, keeping only the packed form of their weights (QuantizedExpertLinear.release_qweight);
        from_pretrained does this. A no-op for other models."""
        if self.device.type != "cpu" or self.dtype != torch.bfloat16:
            return
        probe = torch.empty(0, 0, dtype=torch.bfloat16)
        for module in self.modules():
            if hasattr(module, "release_qweight"):
                module.release_qweight()  # one copy of the weights: the packed form (see QuantizedExpertLinear)
                module.weight_for(probe)

    # --- static KV cache -------------------------------------------------------------------------------------------
    def setup_caches(self, max_batch_size: int, max_seq_length: int) -> None:
        """Allocate (or keep, when the shape is unchanged) a [B, H_kv, L, hd] key and value cache in every layer."""
        if max_seq_length > self.config.n_positions:
            raise ValueError(f"cache length {max_seq_length} exceeds n_positions={self.config.n_positions}")
        cache = self.h[0].mixer.kv_cache if len(self.h) else None
        shape = (max_batch_size, self.config.n_head_kv, max_seq_length, self.config.head_dim)
        if cache is not None and cache.k_cache.shape == shape and cache.k_cache.dtype == self.dtype:
            if cache.k_cache.device == self.device:
                return
        self.decode_graphs = None  # captured over the old cache
        for block in self.h:
            block.mixer.kv_cache = None  # free the old cache before allocating the new one
        for block in self.h:
            block.mixer.kv_cache = KVCache(*shape, dtype=self.dtype, device=self.device)

    def clear_caches(self) -> None:
        self.decode_graphs = None
        for block in self.h:
            block.mixer.kv_cache = None

    def move_cache_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` slots of KV cache row `src` to row `dst` in every layer (a server packing its
        running sequences into the first rows, so that a decode step reads rows 0 .. n - 1 as one view)."""
        for block in self.h:
            cache = block.mixer.kv_cache
            cache.k_cache[dst, :, :length] = cache.k_cache[src, :, :length]
            cache.v_cache[dst, :, :length] = cache.v_cache[src, :, :length]

    def _cache_dim(self, dim: int) -> int:
        # a dimension of the first layer's k cache [B, H_kv, L, hd] (attention.KVCache); 0 when none is set up
        cache = self.h[0].mixer.kv_cache if len(self.h) else None
        return 0 if cache is None else cache.k_cache.shape[dim]

    @property
    def cache_length(self) -> int:
        """Slots in the KV cache (0 when none is set up)."""
        return self._cache_dim(2)

    @property
    def cache_batch_size(self) -> int:
        """Rows in the KV cache (0 when none is set up)."""
        return self._cache_dim(0)

    # --- forward -----------------------------------------------------------------------------------------------------
    def _rope(self, position_ids: torch.Tensor):
        # position_ids [B, S] -> cos, sin [B, S, 1, rotary_dim / 2] fp32, the same arithmetic as transformers' Phi
        device = position_ids.device
        inv_freq = self._inv_freq.get(device)
        if inv_freq is None:
            dim = self.config.rotary_dim
            inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
            inv_freq = self._inv_freq[device] = inv_freq.to(device)
        freqs = position_ids[..., None].float() * inv_freq  # [B, S, rotary_dim / 2]
        return freqs.cos().unsqueeze(2), freqs.sin().unsqueeze(2)

    def hidden_states(self, input_ids, attention_mask=None, input_pos=None, cache_row: int = 0):
        """The decoder body: input_ids [B, S] -> final hidden states [B, S, D] (before lm_head's LayerNorm).

        Arguments as in `forward`.
        """
        B, S = input_ids.shape
        if input_pos is None:
            if S > self.config.n_positions:
                raise ValueError(f"sequence of {S} tokens exceeds n_positions={self.config.n_positions}")
            slots = torch.arange(S, device=input_ids.device)
            L = S
        else:
            if self.cache_length == 0:
                raise RuntimeError("input_pos given but no KV cache: call setup_caches(batch_size, length) first")
            cache_batch = self.cache_batch_size
            if tuple(input_pos.shape) not in ((S,), (B, S)):
                raise ValueError(
                    f"input_pos must have shape [S={S}] or [B={B}, S={S}] (one cache slot per new token), "
                    f"got {tuple(input_pos.shape)}"
                )
            if cache_row < 0 or cache_row + B > cache_batch:
                rows = f" from cache row {cache_row}" if cache_row else ""
                raise ValueError(
                    f"batch of {B} exceeds the KV cache's batch size {cache_batch}{rows}: call setup_caches again"
                )
            slots = input_pos
            L = self.cache_length
        if input_pos is not None and input_pos.dim() == 2:
            # Per-row slots: row b's sequence starts at slot 0 of its cache row, so its slot is its position; what an
            # earlier sequence left in the row's later slots is masked out.
            if attention_mask is not None:
                raise ValueError("attention_mask is for left-padded batches; per-row input_pos [B, S] takes none")
            position_ids = input_pos
            # Attention reads only the slots up to the furthest position, rounded up to 64 (a few key lengths, not
            # one per step): short rows in a long cache then cost what they hold. A host read of input_pos.
            L = min(L, -(-(int(input_pos.max()) + 1) // 64) * 64)
            mask = (torch.arange(L, device=slots.device) <= input_pos[..., None])[:, None]  # [B, 1, S, L]
        elif attention_mask is None:
            position_ids = slots[None].expand(B, S)
            mask = None
            if input_pos is not None:
                mask = (torch.arange(L, device=slots.device)[None] <= slots[:, None])[None, None]  # [1, 1, S, L]
        else:
            if tuple(attention_mask.shape) != (B, L):
                raise ValueError(
                    f"attention_mask must have shape {(B, L)} (batch, cache slots), got {tuple(attention_mask.shape)}"
                )
            valid = attention_mask.bool()  # [B, L], False at pad slots
            # Left padding: a prompt's positions start at 0 at its first real token.
            position_ids = (valid.long().cumsum(-1) - 1).clamp(min=0).gather(1, slots[None].expand(B, S))  # [B, S]
            key = torch.arange(L, device=slots.device)
            causal = key[None] <= slots[:, None]  # [S, L]
            # A pad query attends to itself, so that no row is fully masked (SDPA would return NaN there).
            mask = (causal[None] & valid[:, None, :]) | (key[None] == slots[:, None])[None]  # [B, S, L]
            mask = mask[:, None]  # [B, 1, S, L]
        cos, sin = self._rope(position_ids)
        x = self.wte(input_ids)  # [B, S, D]
        for block in self.h:
            x = block(x, cos, sin, mask, input_pos, cache_row)
        return x

    def forward(self, input_ids, attention_mask=None, input_pos=None, cache_row: int = 0):
        """Logits [B, S, V] in fp32.

        input_ids [B, S] int64.
        attention_mask [B, L] (1 real token, 0 left pad) or None: L = S without a cache, L = cache_length with one.
        input_pos [S] int64: the cache slots these tokens fill (generation); None runs the whole sequence, no cache.
            [B, S]: each row's own slots (continuous batching: row b's sequence fills its cache row from slot 0, and
            attends to the slots up to each of its positions; no attention_mask).
        cache_row: the KV cache row that batch row 0 reads and writes (rows cache_row .. cache_row + B - 1).
        """
        if input_pos is None:
            _check_ids(input_ids, self.config.vocab_size)
        return self.lm_head(self.hidden_states(input_ids, attention_mask, input_pos, cache_row)).float()

    # --- text ------------------------------------------------------------------------------------------------------
    def generate(self, prompt, **kwargs):
        """See `phixtral.generate.generate`: str -> str, list[str] -> list[str], LongTensor [B, S] -> LongTensor."""
        from .generate import generate

        return generate(self, prompt, **kwargs)

    def chat(self, messages, **kwargs):
        """See `phixtral.generate.chat`: the tokenizer's chat template applied to messages, then generate."""
        from .generate import chat

        return chat(self, messages, **kwargs)


def _check_ids(input_ids, vocab_size: int) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be an int64 tensor [B, S], got {getattr(input_ids, 'dtype', type(input_ids))}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape [B, S] with S >= 1, got {tuple(input_ids.shape)}")
    lo, hi = input_ids.aminmax()
    if lo < 0 or hi >= vocab_size:  # one host read, outside the decode loop
        raise ValueError(f"input_ids must lie in [0, vocab_size={vocab_size}), got values in [{int(lo)}, {int(hi)}]")
