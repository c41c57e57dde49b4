"""The `serve` subcommand moved to phixtral.commands.serve; this name still imports it."""

import warnings

from ..commands.serve import add_parser, run, served_name  # noqa: F401

warnings.warn(
    "phixtral.serve.command moved to phixtral.commands.serve; import it from there", DeprecationWarning, stacklevel=2
)
