"""The commands built on the decoder: merge, eval, inspect, train-router, quantize (each one file with add_parser and run)."""
