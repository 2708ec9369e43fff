"""Progress of a long job, one helper for every command.

    from runtimes.progress import progress

    with progress(total=120, desc="sample fuji (ort)", unit="step") as bar:
        for ...:
            bar.update(1)                        # n units done
            bar.set_postfix(loss_x=f"{x:.4f}")   # optional fields shown after the count
            bar.write("a line of its own")       # printed above the bar, never torn by it

Where stderr is a terminal this is a tqdm bar that disappears when the job ends (its results
are the lines printed after it). Elsewhere (a redirected log, CI) it prints plain, sparse lines
to stderr instead: one when each further 10% of `total` is done, and one at the end if the last
10% line was not it, so a log holds no bar fragments:

    sample fuji (ort): 12/120 steps (10%), 0.4 s
    ...
    sample fuji (ort): 120/120 steps (100%), 3.9 s

With enabled=False nothing is shown but what write() prints. write() goes to stdout in all
modes, like print. tqdm is imported only for a terminal: the engine-only tools do not need it.
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator, TextIO


class PlainLines:
    """The bar's interface as plain lines: one at each further tenth of the total, one at the end."""

    def __init__(self, total: int, desc: str, unit: str, initial: int, stream: TextIO):
        self.total, self.desc, self.unit, self.n, self.stream = total, desc, unit, initial, stream
        self.start = time.perf_counter()
        self.postfix: dict[str, object] = {}
        self.shown_tenths = self._tenths()  # a resumed job does not repeat the lines already passed
        self.shown_n = initial

    def _tenths(self) -> int:
        return 10 * self.n // self.total if self.total > 0 else 0

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._tenths() > self.shown_tenths:
            self.shown_tenths = self._tenths()
            self._line()

    def set_postfix(self, **fields) -> None:
        self.postfix = fields

    def write(self, line: str) -> None:
        print(line, flush=True)

    def close(self) -> None:
        if self.n != self.shown_n:
            self._line()

    def _line(self) -> None:
        self.shown_n = self.n
        percent = f" ({100 * self.n / self.total:.0f}%)" if self.total > 0 else ""
        fields = "".join(f", {k} {v}" for k, v in self.postfix.items())
        print(f"{self.desc}: {self.n}/{self.total} {self.unit}s{percent}, "
              f"{time.perf_counter() - self.start:.1f} s{fields}", file=self.stream, flush=True)


class TerminalBar:
    """A tqdm bar on a terminal; it leaves no trace when closed."""

    def __init__(self, total: int, desc: str, unit: str, initial: int, stream: TextIO):
        from tqdm import tqdm

        self._tqdm = tqdm
        self.bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, file=stream, leave=False,
                        dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def set_postfix(self, **fields) -> None:
        self.bar.set_postfix(fields, refresh=False)

    def write(self, line: str) -> None:
        self._tqdm.write(line, file=sys.stdout)

    def close(self) -> None:
        self.bar.close()


class Hidden:
    """Shows nothing; write() still prints."""

    def __init__(self, *args):
        pass

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **fields) -> None:
        pass

    def write(self, line: str) -> None:
        print(line, flush=True)

    def close(self) -> None:
        pass


@contextmanager
def progress(total: int, desc: str, unit: str = "step", initial: int = 0, enabled: bool = True,
             stream: TextIO | None = None) -> Iterator[PlainLines | TerminalBar | Hidden]:
    """Show the progress of a job of `total` units (see the module docstring).

    Args:
        total: the units the whole job has (steps, calls); initial: those already done (a resume).
        desc: what is running, shown before the count, e.g. "train mdlm".
        unit: the unit's name, singular ("step" -> "12/120 steps").
        enabled: False shows nothing (for a --no-progress option).
        stream: where the bar or the lines go; sys.stderr when None.
    Yields:
        the bar: update(n=1), set_postfix(**fields), write(line).
    """
    stream = sys.stderr if stream is None else stream
    if not enabled:
        kind = Hidden
    elif stream.isatty():
        kind = TerminalBar
    else:
        kind = PlainLines
    bar = kind(total, desc, unit, initial, stream)
    completed = False
    try:
        yield bar
        completed = True
    finally:
        # An interrupted or failed job leaves its last line as it was; a finished one reports its end.
        if completed or kind is TerminalBar:
            bar.close()
