"""The `phixtral` subcommands, one file each with add_parser and run: generate, serve, merge, eval (evaluate.py),
inspect (inspect_model.py), train-router, quantize. args.py holds what they share: value types and the model flags."""
