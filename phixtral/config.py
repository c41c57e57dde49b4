"""PhixtralConfig: one dataclass for phixtral (phi-msft MoE), dense phi-msft phi-2 and the HF-native `phi` layout.

config.json comes in two layouts:
    phi-msft  model_type "phi-msft": n_embd, n_head, n_head_kv, n_inner, n_layer, n_positions, rotary_dim,
              layer_norm_epsilon, activation_function, and for phixtral num_local_experts / num_experts_per_tok.
              No rope_theta (base 10000).
    phi       model_type "phi" (PhiForCausalLM): hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
              num_key_value_heads, max_position_embeddings, partial_rotary_factor and rope_theta (top level, or inside
              `rope_parameters` since transformers 5), layer_norm_eps, hidden_act.
A dense model is one expert with top_k 1, so the decoder has a single code path.
"""

from dataclasses import dataclass
from typing import Any, Optional

MODEL_TYPES = ("phi-msft", "phi")

# All spellings of phi-2's tanh-approximated GELU; the MoE kernels compute exactly this activation and nothing else.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")

_MSFT_REQUIRED = ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions", "rotary_dim")
_HF_REQUIRED = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
)

_DTYPE_NAMES = ("float16", "bfloat16", "float32")


@dataclass
class PhixtralConfig:
    """Shapes and hyper-parameters of a phi-2 / phixtral decoder (D = n_embd, F = n_inner, E = num_local_experts)."""

    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int
    n_positions: int
    rotary_dim: int
    n_inner: Optional[int] = None  # None: 4 * n_embd, as phi-msft
    n_head_kv: Optional[int] = None  # None: n_head (phi-2 has no grouped-query attention)
    rope_theta: float = 10000.0
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    num_local_experts: int = 1
    num_experts_per_tok: int = 1
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[Any] = None  # int or list of ints
    torch_dtype: Optional[str] = None  # the dtype the checkpoint was saved in, e.g. "float16"
    model_type: str = "phi-msft"  # the layout config.json was read from

    def __post_init__(self):
        if self.n_inner is None:
            self.n_inner = 4 * self.n_embd
        if self.n_head_kv is None:
            self.n_head_kv = self.n_head
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 1

    def validate(self) -> None:
        """Raise a ValueError naming the field when the values do not describe a model this decoder can run."""
        for name in ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions", "n_inner", "n_head_kv"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"config: {name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_head_kv:
            raise ValueError(f"config: n_head={self.n_head} is not a multiple of n_head_kv={self.n_head_kv}")
        r = self.rotary_dim
        if isinstance(r, bool) or not isinstance(r, int) or r < 0 or r % 2 or r > self.head_dim:
            raise ValueError(f"config: rotary_dim must be an even int in [0, head_dim={self.head_dim}], got {r!r}")
        if not self.rope_theta > 0:
            raise ValueError(f"config: rope_theta must be > 0, got {self.rope_theta!r}")
        if not self.layer_norm_epsilon > 0:
            raise ValueError(f"config: layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}")
        if self.activation_function not in TANH_GELUS:
            raise ValueError(
                f"config: activation_function {self.activation_function!r} is not supported; the MoE kernels compute "
                f"gelu_new (tanh approximation), spelled one of {TANH_GELUS}"
            )
        E, k = self.num_local_experts, self.num_experts_per_tok
        if isinstance(E, bool) or not isinstance(E, int) or E < 1:
            raise ValueError(f"config: num_local_experts must be a positive int, got {E!r}")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= E:
            raise ValueError(f"config: num_experts_per_tok must be an int in [1, num_local_experts={E}], got {k!r}")
        if self.torch_dtype is not None and self.torch_dtype not in _DTYPE_NAMES:
            raise ValueError(f"config: torch_dtype must be one of {_DTYPE_NAMES}, got {self.torch_dtype!r}")

    # ------------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict, *, num_experts_per_tok: Optional[int] = None) -> "PhixtralConfig":
        """Read a config.json dict in the phi-msft or the HF `phi` layout.

        num_experts_per_tok overrides the checkpoint's top_k (e.g. 1 to run phixtral-4x2_8 with one expert per token).
        """
        if not isinstance(d, dict):
            raise TypeError(f"config must be a dict, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type == "phi-msft":
            kwargs = _from_msft(d)
        elif model_type == "phi":
            kwargs = _from_hf(d)
        else:
            raise ValueError(
                f"config: unknown model_type {model_type!r}; supported: {MODEL_TYPES} "
                "(phixtral and the original phi-2 use 'phi-msft', transformers' PhiForCausalLM uses 'phi')"
            )
        if num_experts_per_tok is not None:
            kwargs["num_experts_per_tok"] = num_experts_per_tok
        elif kwargs["num_experts_per_tok"] is None:
            raise ValueError(
                f"config: num_local_experts={kwargs['num_local_experts']} but no num_experts_per_tok; "
                "pass num_experts_per_tok= to choose how many experts run per token"
            )
        dtype = d.get("torch_dtype", d.get("dtype"))
        kwargs["torch_dtype"] = dtype if dtype in _DTYPE_NAMES else None
        kwargs["bos_token_id"] = d.get("bos_token_id")
        kwargs["eos_token_id"] = d.get("eos_token_id")
        kwargs["model_type"] = model_type
        return cls(**kwargs)

    def to_msft_dict(self) -> dict:
        """The config.json of this model in the phi-msft layout (what phixtral ships); inverse of from_dict."""
        d = {
            "architectures": ["PhiForCausalLM"],
            "model_type": "phi-msft",
            "activation_function": self.activation_function,
            "vocab_size": self.vocab_size,
            "n_embd": self.n_embd,
            "n_head": self.n_head,
            "n_head_kv": None if self.n_head_kv == self.n_head else self.n_head_kv,
            "n_inner": None if self.n_inner == 4 * self.n_embd else self.n_inner,
            "n_layer": self.n_layer,
            "n_positions": self.n_positions,
            "rotary_dim": self.rotary_dim,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "tie_word_embeddings": False,
        }
        if self.rope_theta != 10000.0:
            d["rope_theta"] = self.rope_theta  # not a phi-msft key: the original code ignores it, from_dict reads it
        if self.is_moe:
            d["num_local_experts"] = self.num_local_experts
            d["num_experts_per_tok"] = self.num_experts_per_tok
        for key in ("bos_token_id", "eos_token_id", "torch_dtype"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        return d


def _number(d: dict, key: str, default: float) -> float:
    """d[key] as a float (default when absent or null), or a ValueError naming the key."""
    value = d.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        raise ValueError(f"config: {key} must be a finite number, got {value!r}")
    return float(value)


def _missing(d: dict, keys) -> None:
    missing = [k for k in keys if d.get(k) is None]
    if missing:
        raise ValueError(f"config ({d.get('model_type')}): missing required keys {missing}")


def _reject_tied(d: dict) -> None:
    if d.get("tie_word_embeddings"):
        raise ValueError(
            "config: tie_word_embeddings=true is not supported (phi-2 and phixtral have an untied lm_head)"
        )


def _from_msft(d: dict) -> dict:
    _missing(d, _MSFT_REQUIRED)
    _reject_tied(d)
    experts = d.get("num_local_experts")
    return dict(
        vocab_size=d["vocab_size"],
        n_embd=d["n_embd"],
        n_layer=d["n_layer"],
        n_head=d["n_head"],
        n_head_kv=d.get("n_head_kv"),
        n_inner=d.get("n_inner"),
        n_positions=d["n_positions"],
        rotary_dim=d["rotary_dim"],
        rope_theta=_number(d, "rope_theta", 10000.0),
        layer_norm_epsilon=_number(d, "layer_norm_epsilon", 1e-5),
        activation_function=d.get("activation_function", "gelu_new"),
        num_local_experts=1 if experts is None else experts,
        num_experts_per_tok=1 if experts is None else d.get("num_experts_per_tok"),
    )


def _from_hf(d: dict) -> dict:
    _missing(d, _HF_REQUIRED)
    _reject_tied(d)
    if d.get("qk_layernorm"):
        raise ValueError("config: qk_layernorm=true is not supported (phi-2 has no q/k LayerNorm)")
    rope = dict(d.get("rope_parameters") or {})
    scaling = d.get("rope_scaling")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default" or scaling:
        raise ValueError(f"config: only default RoPE is supported, got rope_parameters={rope} rope_scaling={scaling}")
    # transformers 5 moves these two into rope_parameters; PhiConfig's default factor is 0.5 when neither place has it.
    factor = _number(rope, "partial_rotary_factor", _number(d, "partial_rotary_factor", 0.5))
    theta = _number(rope, "rope_theta", _number(d, "rope_theta", 10000.0))
    hidden, heads = d["hidden_size"], d["num_attention_heads"]
    for key in ("hidden_size", "num_attention_heads", "head_dim"):
        value = d.get(key)
        if key in d and value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"config: {key} must be a positive int, got {value!r}")
    head_dim = d.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise ValueError(f"config: head_dim={head_dim} * num_attention_heads={heads} != hidden_size={hidden}")
    return dict(
        vocab_size=d["vocab_size"],
        n_embd=hidden,
        n_layer=d["num_hidden_layers"],
        n_head=heads,
        n_head_kv=d.get("num_key_value_heads"),
        n_inner=d["intermediate_size"],
        n_positions=d["max_position_embeddings"],
        rotary_dim=int(head_dim * factor),  # as transformers: int(head_dim * partial_rotary_factor)
        rope_theta=theta,
        layer_norm_epsilon=_number(d, "layer_norm_eps", 1e-5),
        activation_function=d.get("hidden_act", "gelu_new"),
        num_local_experts=1,
        num_experts_per_tok=1,
    )
