"""The commands built on the decoder: merge, eval, inspect, train-router (each one file with add_parser and run)."""
