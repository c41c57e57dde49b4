"""Deprecated: GPTQ moved to the phixtral.quant package (the format in phixtral/quant/gptq_format.py, RTN in
phixtral/quant/rtn.py). This module re-exports its former names."""

import warnings

from .quant import (
    QUANT_SUFFIXES,
    QUANTIZE_CONFIG_FILE,
    RUNTIME_QUANTIZED,
    GPTQConfig,
    float_bias,
    float_weight,
    quantizable,
    quantize_model_rtn,
    read_quantization_config,
    set_quantized,
)
from .quant.gptq_format import (
    check_g_idx,
    checkpoint_tensor,
    dequantize_staged,
    finish_quantized,
    linear_modules,
    quantized_map,
    write_quantize_config,
)

warnings.warn("phixtral.gptq is deprecated: import from phixtral.quant", DeprecationWarning, stacklevel=2)

__all__ = [
    "GPTQConfig",
    "QUANTIZE_CONFIG_FILE",
    "QUANT_SUFFIXES",
    "RUNTIME_QUANTIZED",
    "check_g_idx",
    "checkpoint_tensor",
    "dequantize_staged",
    "finish_quantized",
    "float_bias",
    "float_weight",
    "linear_modules",
    "quantizable",
    "quantize_model_rtn",
    "quantized_map",
    "read_quantization_config",
    "set_quantized",
    "write_quantize_config",
]
