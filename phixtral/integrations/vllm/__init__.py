"""vLLM plugin: phixtral, dense phi-2 (phi-msft layout) and HF phi on vLLM, with phixtral_kernels' fused MoE inside.

Installed with this package (entry point `vllm.general_plugins`: phixtral = phixtral.integrations.vllm:register),
vLLM calls `register()` in every process it starts. It registers
    - the architecture `PhixtralForCausalLM` (model.py, imported lazily by vLLM);
    - transformers' config class for model_type `phi-msft` (hf_config.py), which names that architecture: a phixtral or
      phi-msft phi-2 folder then loads with no flag and no remote code.
HF-layout phi (model_type `phi`) stays on vLLM's own path unless asked for this one:
`hf_overrides={"architectures": ["PhixtralForCausalLM"]}`.

Only model.py imports vLLM; sharding.py, ops.py and hf_config.py are plain torch / transformers.
"""

from .hf_config import ARCHITECTURE

MODEL_CLASS = "phixtral.integrations.vllm.model:PhixtralForCausalLM"

__all__ = ["ARCHITECTURE", "MODEL_CLASS", "register"]


def register() -> None:
    """Register the phi-msft config class with transformers and PhixtralForCausalLM with vLLM (safe to call again)."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from .hf_config import PhiMsftConfig

    AutoConfig.register(PhiMsftConfig.model_type, PhiMsftConfig, exist_ok=True)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
