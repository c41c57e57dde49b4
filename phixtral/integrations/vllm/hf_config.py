"""transformers' config class for phi-msft checkpoints (phixtral, the original phi-2), for vLLM.

transformers has no `phi-msft` model_type: without this class, AutoConfig (and so vLLM) can only read such a folder by
running the remote code its auto_map names. Registered under `phi-msft`, it reads config.json as it is, answers to the
HF attribute names vLLM asks for (hidden_size, num_attention_heads, num_key_value_heads, ...) through attribute_map,
and names the plugin's architecture, so that vLLM picks the phixtral model for a phi-msft folder with no override.
Imports transformers only (not vLLM): the default test suite checks it.
"""

from transformers import PretrainedConfig

ARCHITECTURE = "PhixtralForCausalLM"


class PhiMsftConfig(PretrainedConfig):
    """config.json of phixtral / phi-msft phi-2 (see phixtral.config for the keys); `architectures` is always ours."""

    model_type = "phi-msft"
    attribute_map = {
        "hidden_size": "n_embd",
        "num_attention_heads": "n_head",
        "num_key_value_heads": "n_head_kv",
        "num_hidden_layers": "n_layer",
        "intermediate_size": "n_inner",
        "max_position_embeddings": "n_positions",
        "layer_norm_eps": "layer_norm_epsilon",
        "hidden_act": "activation_function",
    }

    def __init__(
        self,
        vocab_size=51200,
        n_embd=2560,
        n_layer=32,
        n_head=32,
        n_head_kv=None,
        n_inner=None,
        n_positions=2048,
        rotary_dim=32,
        rope_theta=10000.0,
        layer_norm_epsilon=1e-5,
        activation_function="gelu_new",
        num_local_experts=1,
        num_experts_per_tok=1,
        tie_word_embeddings=False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.n_embd = n_embd
        self.n_layer = n_layer
        self.n_head = n_head
        # Resolved here: vLLM takes the first of n_head_kv / num_kv_heads / num_key_value_heads that exists, even null.
        self.n_head_kv = n_head if n_head_kv is None else n_head_kv
        self.n_inner = 4 * n_embd if n_inner is None else n_inner
        self.n_positions = n_positions
        self.rotary_dim = rotary_dim
        self.rope_theta = rope_theta
        self.layer_norm_epsilon = layer_norm_epsilon
        self.activation_function = activation_function
        self.num_local_experts = num_local_experts
        self.num_experts_per_tok = num_experts_per_tok
        kwargs["architectures"] = [ARCHITECTURE]  # phi-msft folders say PhiForCausalLM, which vLLM maps elsewhere
        kwargs.pop("auto_map", None)  # never point at the remote code: this class replaces it
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head
