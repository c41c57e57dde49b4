"""PhixtralForCausalLM for vLLM: phi-2's parallel block on vLLM's layers, each MLP a phixtral MoE run by fused_moe.

The block is phixtral.model's: `x = x + attn(ln(x)) + moe(ln(x))`, partial NeoX rotary on the first rotary_dim dims of
each head, a LayerNorm and a biased, untied head. vLLM provides the paged KV cache and its attention backends
(continuous batching), QKVParallelLinear / RowParallelLinear (tensor parallelism), the vocab-parallel embedding and
head. The MoE layer is `phixtral::fused_moe` over this rank's slice of every expert (see sharding.py): Triton on CUDA,
the torch backend on the CPU. A dense checkpoint is one expert with top_k 1, as in phixtral.model.

Module names keep phixtral's (wte, h.N.ln, h.N.mixer.Wqkv, h.N.mixer.out_proj, h.N.moe.gate / fc1 / fc2), so the loader
is phixtral.layouts.checkpoint_map plus the per-rank slicing of sharding.py. Shapes: T flattened tokens (vLLM batches
every running sequence into one [T] row), D model dim, F expert hidden dim (F_r = F / tensor-parallel size), E experts.
"""

from collections.abc import Iterable

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from vllm.model_executor.layers.attention import Attention as PagedAttention
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.sequence import IntermediateTensors

from ...config import PhixtralConfig
from ...layouts import IGNORED_SUFFIXES, checkpoint_map, detect_layout
from .ops import fused_moe_op
from .sharding import (
    checkpoint_targets,
    expert_name,
    expert_rows,
    qkv_shards,
    shard_expert_tensor,
    vllm_param_name,
)


def phixtral_config(hf_config) -> PhixtralConfig:
    """The PhixtralConfig of vLLM's hf_config (PhiMsftConfig or transformers' PhiConfig), hf_overrides applied."""
    return PhixtralConfig.from_dict(hf_config.to_dict())


class Attention(nn.Module):
    """Causal self-attention on this rank's heads; returns out_proj's partial sum (its bias added on rank 0 only)."""

    def __init__(self, config: PhixtralConfig, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        world = get_tensor_model_parallel_world_size()
        self.rank = get_tensor_model_parallel_rank()
        hd = config.head_dim
        if config.n_head % world or (config.n_head_kv % world and world % config.n_head_kv):
            raise ValueError(f"n_head={config.n_head}, n_head_kv={config.n_head_kv}: not shardable over {world} ranks")
        self.n_head = config.n_head // world
        self.n_head_kv = max(1, config.n_head_kv // world)
        self.q_size, self.kv_size = self.n_head * hd, self.n_head_kv * hd
        # Wqkv rows [Q | K | V] of this rank's heads, bias included.
        self.Wqkv = QKVParallelLinear(
            config.n_embd, hd, config.n_head, config.n_head_kv, bias=True, prefix=f"{prefix}.Wqkv"
        )
        # No reduction here: the block reduces attention and MoE together. vLLM adds a row-parallel bias only when it
        # reduces, so the bias comes back unadded (skip_bias_add) and rank 0 adds it.
        self.out_proj = RowParallelLinear(
            config.n_head * hd,
            config.n_embd,
            bias=True,
            skip_bias_add=True,
            reduce_results=False,
            prefix=f"{prefix}.out_proj",
        )
        self.rotary_emb = None
        if config.rotary_dim:
            rope = {"rope_type": "default", "rope_theta": config.rope_theta, "rope_dim": config.rotary_dim}
            self.rotary_emb = get_rope(hd, max_position=config.n_positions, is_neox_style=True, rope_parameters=rope)
        self.attn = PagedAttention(
            self.n_head,
            hd,
            hd**-0.5,
            num_kv_heads=self.n_head_kv,
            cache_config=vllm_config.cache_config,
            prefix=f"{prefix}.attn",  # unique per layer: vLLM keys the KV cache by it
        )

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # positions [T]; x [T, D] -> partial [T, D]
        qkv, _ = self.Wqkv(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.rotary_emb is not None:
            q, k = self.rotary_emb(positions, q, k)
        y, bias = self.out_proj(self.attn(q, k, v))
        return y + bias if self.rank == 0 else y


class ExpertShard(nn.Module):
    """This rank's slice of E stacked torch Linears: weight [E, out, in], bias [E, out] (filled by the loader)."""

    def __init__(self, num_experts: int, out_features: int, in_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(num_experts, out_features), requires_grad=False)


class MoE(nn.Module):
    """Router + E experts fc2(gelu_new(fc1(x))) on this rank's F slice; returns the partial sum (fc2 bias on rank 0)."""

    def __init__(self, config: PhixtralConfig):
        super().__init__()
        world = get_tensor_model_parallel_world_size()
        E, D = config.num_local_experts, config.n_embd
        rows = expert_rows(config.n_inner, get_tensor_model_parallel_rank(), world)
        F_r = rows.stop - rows.start
        if config.is_moe:
            self.gate = nn.Linear(D, E, bias=False)  # whole on every rank, so that every rank routes alike
            self.gate.weight.requires_grad_(False)
        else:
            self.gate = None  # one expert: softmax of its one logit is 1 whatever the gate holds
            self.register_buffer("gate_weight", torch.zeros(1, D), persistent=False)
        self.fc1 = ExpertShard(E, F_r, D)  # w1 [E, F_r, D], b1 [E, F_r]
        self.fc2 = ExpertShard(E, D, F_r)  # w2 [E, D, F_r], b2 [E, D] (zeros on ranks > 0)
        self.top_k = config.num_experts_per_tok
        self.backend = "auto"  # Triton on CUDA (sm_80+), the torch backend elsewhere

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [T, D] -> partial [T, D]
        gate = self.gate.weight if self.gate is not None else self.gate_weight
        w1, b1, w2, b2 = self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias
        return fused_moe_op(x, gate, w1, b1, w2, b2, self.top_k, self.backend)


class Block(nn.Module):
    """Parallel residual block: x + all_reduce(attn_partial(ln(x)) + moe_partial(ln(x))), one all-reduce per layer."""

    def __init__(self, config: PhixtralConfig, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        self.ln = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mixer = Attention(config, vllm_config, prefix=f"{prefix}.mixer")
        self.moe = MoE(config)
        self.world = get_tensor_model_parallel_world_size()

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        y = self.mixer(positions, h) + self.moe(h)
        if self.world > 1:
            y = tensor_model_parallel_all_reduce(y)
        return y + x  # summed in phixtral's order on one rank


@support_torch_compile
class PhixtralModel(nn.Module):
    """Embedding, blocks and the head's LayerNorm (the part vLLM compiles): input_ids [T] -> hidden [T, D]."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = phixtral_config(vllm_config.model_config.hf_config)
        self.wte = VocabParallelEmbedding(config.vocab_size, config.n_embd, prefix=f"{prefix}.wte")
        self.h = nn.ModuleList(Block(config, vllm_config, prefix=f"{prefix}.h.{i}") for i in range(config.n_layer))
        self.final_ln = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.wte(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = inputs_embeds if inputs_embeds is not None else self.wte(input_ids)  # [T, D]
        for block in self.h:
            x = block(positions, x)
        return self.final_ln(x)


class PhixtralForCausalLM(nn.Module):
    """phixtral (phi-msft MoE), dense phi-2 (phi-msft or HF layout) for vLLM, with the head: logits [T, V]."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise ValueError("PhixtralForCausalLM supports tensor parallelism, not pipeline parallelism")
        if vllm_config.quant_config is not None:  # the experts are plain fp16 / bf16 / fp32 tensors for fused_moe
            raise ValueError("PhixtralForCausalLM runs unquantized checkpoints only")
        self.config = phixtral_config(vllm_config.model_config.hf_config)
        self.model = PhixtralModel(vllm_config=vllm_config, prefix=f"{prefix}.model" if prefix else "model")
        self.lm_head = ParallelLMHead(
            self.config.vocab_size, self.config.n_embd, bias=True, prefix=f"{prefix}.lm_head" if prefix else "lm_head"
        )
        self.logits_processor = LogitsProcessor(self.config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states, self.lm_head.bias)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load a checkpoint in any of the three layouts; returns the names of the parameters filled.

        Raises a ValueError naming the tensors that are unexpected, mis-shaped or missing (for the detected layout).
        """
        config = self.config
        targets = checkpoint_targets(config)
        params = dict(self.named_parameters())
        rank, world = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
        seen, loaded = [], set()
        for name, tensor in weights:
            if name.endswith(IGNORED_SUFFIXES):
                continue
            target = targets.get(name)
            if target is None:
                raise ValueError(f"unexpected tensor {name!r} for this config ({config.num_local_experts} expert(s))")
            if tuple(tensor.shape) != target.shape:
                raise ValueError(f"tensor {name!r}: expected shape {target.shape}, got {tuple(tensor.shape)}")
            param_name = vllm_param_name(target.param)
            param = params[param_name]
            if ".mixer.Wqkv." in param_name:
                for shard, rows in qkv_shards(target, tensor, config):
                    param.weight_loader(param, rows, shard)
            elif (expert := expert_name(param_name)) is not None:
                param.data[target.index[0]].copy_(shard_expert_tensor(expert, tensor, rank, world))
            else:
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            seen.append(name)
            loaded.add(param_name)
        if seen:
            missing = checkpoint_map(config, detect_layout(seen)).keys() - set(seen)
            if missing:
                raise ValueError(f"checkpoint lacks {len(missing)} tensor(s): {sorted(missing)[:20]}")
        return loaded
