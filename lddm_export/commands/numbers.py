"""Integer options for the click commands, with the ranges of runtimes/options.py.

    @click.option("--steps", type=Int(1, MAX_STEPS), ...)

`--steps x`, `--steps 0` and `--steps 1000000000` are each one sentence with exit 1 (the
OptionError passes through click to lddm_export.cli.main), and --help shows the range.
"""
from __future__ import annotations

import click

from runtimes.options import check_int


class Int(click.ParamType):
    """An integer from `low` to `high`, both included."""

    name = "integer"

    def __init__(self, low: int, high: int):
        self.low, self.high = low, high

    def get_metavar(self, param, ctx=None) -> str:
        return f"{self.low}..{self.high}"

    def convert(self, value, param, ctx) -> int:
        name = max(param.opts, key=len) if param is not None else "the value"
        return check_int(name, value, self.low, self.high)
