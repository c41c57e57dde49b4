"""Deprecated: the tuned-table reader lives in `phixtral_kernels.gemm_configs`, with the rest of the GEMM config choice.

Its names stay importable from here. Patching them here changes nothing: patch `gemm_configs` (CONFIG_DIR, load_table,
...), where moe_gemm_configs looks them up.
"""

import warnings

from .gemm_configs import (  # noqa: F401 -- the names this module held
    CONFIG_DIR,
    DEFAULT_SHARED_BYTES,
    DTYPES,
    ENV,
    FORMAT,
    TunedTable,
    clear_cache,
    current_source,
    load_table,
    lookup,
    parse_table,
    source,
    table_name,
    table_path,
)

warnings.warn(
    "phixtral_kernels.tuned_configs is deprecated: import from phixtral_kernels.gemm_configs",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = [
    "ENV",
    "CONFIG_DIR",
    "TunedTable",
    "clear_cache",
    "load_table",
    "lookup",
    "parse_table",
    "source",
    "table_name",
    "table_path",
]
