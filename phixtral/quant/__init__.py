"""Quantized checkpoints: the formats, the packed modules they load into, and the methods that write them.

    format.py        QuantFormat: what the loader (weights.py) and the writer (checkpoint_writer.py) ask of a format
    registry.py      the formats by quant_method; which one a checkpoint folder holds
    gptq_format.py   GPTQ, AutoGPTQ's v1 layout: settings, tensor names and shapes, loading hooks, writing
    modules.py       QuantizedLinear, QuantizedExpertLinear: GPTQ-packed Linears run by phixtral_kernels
    rtn.py           round-to-nearest into the GPTQ layout (and the helpers every method shares)
    on_load.py       quantize on load: a float checkpoint read into packed modules, RTN tensor by tensor
    gptq_solver.py   GPTQ proper, calibrated
    streaming.py     `phixtral quantize` from the files, one Linear (RTN) or one layer (GPTQ) at a time; it reads
                     checkpoints through phixtral.weights, which imports this package, so it is not imported here

weights.py reaches formats only through this package (read_quantization_config, packed_map and the format object's
hooks). A new format is one module here, a QuantFormat subclass registered with `register_format` (below, for the
ones phixtral ships), plus its tests.
"""

from .format import QuantFormat
from .gptq_format import QUANT_SUFFIXES, QUANTIZE_CONFIG_FILE, RUNTIME_QUANTIZED, GPTQConfig
from .gptq_solver import gptq_quantize, quantize_model_gptq
from .modules import QuantizedExpertLinear, QuantizedLinear, quantized_module
from .on_load import OnLoadQuantizer, packed_modules, prepare_on_load, quantize_spec
from .registry import (
    FORMATS,
    missing_settings_hint,
    packed_map,
    read_quantization_config,
    register_format,
    unregister_format,
)
from .rtn import (
    float_bias,
    float_weight,
    quantizable,
    quantize_linear,
    quantize_model_rtn,
    quantize_rows,
    set_quantized,
)

register_format(GPTQConfig)

__all__ = [
    "FORMATS",
    "GPTQConfig",
    "OnLoadQuantizer",
    "QUANTIZE_CONFIG_FILE",
    "QUANT_SUFFIXES",
    "QuantFormat",
    "QuantizedExpertLinear",
    "QuantizedLinear",
    "RUNTIME_QUANTIZED",
    "float_bias",
    "float_weight",
    "gptq_quantize",
    "missing_settings_hint",
    "packed_map",
    "packed_modules",
    "prepare_on_load",
    "quantizable",
    "quantize_model_gptq",
    "quantize_linear",
    "quantize_model_rtn",
    "quantize_rows",
    "quantize_spec",
    "quantized_module",
    "read_quantization_config",
    "register_format",
    "set_quantized",
    "unregister_format",
]
