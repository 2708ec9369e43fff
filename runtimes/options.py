"""Command-line numbers: every integer option's stated range, and the size of a sampling job.

    check_int("--steps", value, 1, MAX_STEPS)       an int in [low, high], or one sentence
    parse_int_list("--batch", "1,8,64", 1, MAX_BATCH, ...)
    check_job(num, batch, steps, latent_steps, shapes)   memory and length, before any work
    steps_per_call(steps, latent_steps, latent_candidates)   the steps one sampling call makes

lddm-export (click) and lddm-train (argparse) both call these, so the same input gets the same
sentence from either tool, and so does training/sampling.py for its arguments. Pure Python
(no torch).
"""
from __future__ import annotations

import numbers

from runtimes.errors import LddmError

MAX_STEPS = 100_000               # token or latent steps of one chain
MAX_SAMPLES = 10_000_000          # samples of one run (--num, verify --samples)
MAX_BATCH = 65_536                # a batch, and every entry of a batch profile
MAX_SEED = 2**32 - 1
MAX_THREADS = 1024
MAX_LATENT_CANDIDATES = 256       # SEQ latent chains per prompted sample
MAX_NOISE_BYTES = 4 * 2**30       # one call's noise: u float64 [T_x, B, L] and y_init float32 [B, P, D]
MAX_RESULT_BYTES = 4 * 2**30      # a run's samples held in memory: int64 [K, L] and float32 [K, P, D]
MAX_GRAPH_CALLS = 100_000_000     # graph calls of one run: about a day at 1 ms a call


class OptionError(LddmError):
    """A command-line number is not an integer, is out of its range, or asks for an absurd job."""


def _describe(low: int) -> str:
    return {0: "a non-negative integer", 1: "a positive integer"}.get(low, f"an integer >= {low}")


def check_int(name: str, value, low: int, high: int) -> int:
    """`value` (an int or its text) as an int in [low, high].

    Args:
        name: the option as the user typed it ("--steps"), or the argument's name;
            value: the int (numpy's included) or the text given.
        low, high: the stated range, inclusive.
    Returns:
        the integer.
    Raises:
        OptionError: "--steps must be a positive integer, got 0; pass an integer from 1 to 100000"
            (or "... is above the limit of ...", "must be an integer, got 'x'"), from the CLIs
            and the Python sampling API (training.sampling) alike. Not a ValueError: argparse
            would replace a ValueError's message with its own.
    """
    fix = f"pass an integer from {low} to {high}"
    if isinstance(value, str):
        try:
            value = int(value.strip(), 10)
        except ValueError:
            raise OptionError(f"{name} must be an integer, got {value!r}; {fix}") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise OptionError(f"{name} must be an integer, got {value!r}; {fix}")
    value = int(value)
    if value < low:
        raise OptionError(f"{name} must be {_describe(low)}, got {value}; {fix}")
    if value > high:
        raise OptionError(f"{name} {value} is above the limit of {high}; {fix}")
    return value


def parse_int_list(name: str, text: str, low: int, high: int, expected: str) -> list[int]:
    """"1,8,64" -> [1, 8, 64], each checked to lie in [low, high].

    Args:
        name: the option ("--batch"); text: what the user typed.
        low, high: the range of every entry.
        expected: what the option takes, for the message ("positive integers separated by
            commas, e.g. 1,32").
    Raises:
        OptionError: "--batch '1,8,x' must be EXPECTED; 'x' is not an integer from 1 to 65536".
    """
    values = []
    for part in str(text).split(","):
        try:
            values.append(check_int(name, part, low, high))
        except OptionError:
            raise OptionError(f"{name} {text!r} must be {expected}; {part.strip()!r} is not an integer "
                              f"from {low} to {high}") from None
    return values


def steps_per_call(steps: int, latent_steps: int | None, latent_candidates: int = 1) -> int:
    """The steps one sampling call reports (and the graph calls it makes at most): T_x token
    steps after SEQ's C x T_y latent steps (runtimes.samplers.Sampler.steps)."""
    return steps + latent_candidates * (latent_steps or 0)


def check_job(num: int, batch: int, steps: int, latent_steps: int | None, shapes: dict,
              latent_candidates: int = 1) -> None:
    """Refuse a sampling job whose memory or length is absurd, before anything is allocated.

    Args:
        num: K samples; batch: B samples per call; steps: T_x; latent_steps: T_y or None.
        shapes: the bundle's {"L", "P", "D", ...}.
        latent_candidates: C, SEQ's latent chains per sample (runtimes.noise).
    Raises:
        OptionError: one sentence with the estimate, the limit and the options to lower.
    """
    L, P, D = shapes["L"], shapes.get("P", 0), shapes.get("D", 0)
    noise = 8 * steps * batch * L + 4 * latent_candidates * batch * P * D
    if noise > MAX_NOISE_BYTES:
        raise OptionError(f"one sampling call of batch {batch} x {steps} steps x {L} tokens needs "
                          f"{noise / 2**30:.1f} GiB of noise (float64 [T, B, L]), above the limit of "
                          f"{MAX_NOISE_BYTES / 2**30:.0f} GiB; lower --steps or --batch-size")
    result = 8 * num * L + 4 * num * P * D
    if result > MAX_RESULT_BYTES:
        raise OptionError(f"{num} samples of {L} tokens take {result / 2**30:.1f} GiB in memory, above the limit "
                          f"of {MAX_RESULT_BYTES / 2**30:.0f} GiB; lower --num and run again with another --seed")
    per_call = steps_per_call(steps, latent_steps, latent_candidates)
    calls = -(-num // batch) * per_call
    if calls > MAX_GRAPH_CALLS:
        raise OptionError(f"{num} samples in batches of {batch} with {per_call} steps each "
                          f"take {calls:,} graph calls, above the limit of {MAX_GRAPH_CALLS:,}; lower --steps "
                          f"or --num, or raise --batch-size")
