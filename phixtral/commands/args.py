"""argparse value types shared by the `phixtral` subcommands: a bad value is reported by argparse under the flag the
user typed (`argument --batch-size: must be >= 1, got 0`), before any model is loaded."""

import argparse


def parse_number(kind, text: str):
    """int(text) or float(text), or the argparse error that names what was expected."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an int' if kind is int else 'a number'}, got {text!r}") from None


def int_at_least(low: int):
    """An int >= low."""

    def parse(text: str) -> int:
        value = parse_number(int, text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def float_in(low: float, high: float = float("inf"), *, low_open: bool = False, high_open: bool = False):
    """A finite float in [low, high]; low_open / high_open exclude an end."""

    def parse(text: str) -> float:
        value = parse_number(float, text)
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if value != value or abs(value) == float("inf") or below or above:
            left = "(" if low_open else "["
            right = ")" if high_open or high == float("inf") else "]"
            raise argparse.ArgumentTypeError(f"must be in {left}{low:g}, {high:g}{right}, got {text}")
        return value

    parse.__name__ = "number"
    return parse


def seed(text: str) -> int:
    """A torch generator seed: an int in [0, 2**64)."""
    value = parse_number(int, text)
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**64), got {value}")
    return value
