"""Adapters that plug phixtral into other tools; each imports its tool, so import the one you use.

lm_eval.py  lm-evaluation-harness model `phixtral` (needs the lm_eval extra: pip install 'phixtral-kernels[lm_eval]')
vllm/       vLLM plugin: the architecture PhixtralForCausalLM, registered through the `vllm.general_plugins` entry point
"""
