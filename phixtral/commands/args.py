"""argparse value types shared by the `phixtral` subcommands: a bad value is reported by argparse under the flag the
user typed (`argument --batch-size: must be >= 1, got 0`), before any model is loaded."""

import argparse


def _parse(kind, text: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an int' if kind is int else 'a number'}, got {text!r}") from None


def int_at_least(low: int):
    """An int >= low."""

    def parse(text: str) -> int:
        value = _parse(int, text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def float_in(low: float, high: float = float("inf"), *, low_open: bool = False):
    """A finite float in [low, high] ((low, high] when low_open)."""

    def parse(text: str) -> float:
        value = _parse(float, text)
        below = value <= low if low_open else value < low
        if value != value or abs(value) == float("inf") or below or value > high:
            left = "(" if low_open else "["
            right = ")" if high == float("inf") else "]"
            raise argparse.ArgumentTypeError(f"must be in {left}{low:g}, {high:g}{right}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def seed(text: str) -> int:
    """A torch generator seed: an int in [0, 2**64)."""
    value = _parse(int, text)
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64), got {value}")
    return value
