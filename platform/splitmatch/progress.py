"""What a user watches: one live progress display per long phase (toy CLIP steps, pseudo-mask
images, training iterations, evaluation images), and the warnings that matter in plain sentences.

On a terminal it is a tqdm bar; on anything else (a log file, a CI job, `ray job logs`, a
terminal that reports no size) it is one line every `LINE_EVERY_S` seconds and a last line at the
end, since a redrawn bar would write carriage returns into the log. Ray's and Ray Train's own INFO
lines stay hidden unless `--verbose` (SPLITMATCH_VERBOSE=1, which Ray workers and jobs inherit).
"""
from __future__ import annotations

import io
import os
import sys
import time

LINE_EVERY_S = 5.0


def verbose() -> bool:
    return os.environ.get("SPLITMATCH_VERBOSE") == "1"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60:02d}:{seconds % 60:02d}"


def _shows_a_bar(stream) -> bool:
    """A terminal that reports its size. A pseudo-terminal opened without one (`script` with no
    terminal behind it, some CI runners) reports 0 rows, and tqdm then hides its bar entirely:
    the user would see nothing for minutes."""
    if not stream.isatty():
        return False
    try:
        size = os.get_terminal_size(stream.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        return False
    return size.columns > 0 and size.lines > 0


class Progress:
    """`with Progress(total, "training") as bar: bar.update(n, loss=1.2)`."""

    def __init__(self, total: int, what: str, unit: str = "it", initial: int = 0, stream=None,
                 leave: bool = True):
        """`leave=False`: on a terminal, the bar is cleared when it closes (a phase inside
        another one's display); off a terminal the last line is written either way."""
        self.total, self.what, self.unit = total, what, unit
        self.done = initial
        self.stream = stream or sys.stdout
        self.start = time.monotonic()
        # The rate (for the ETA) counts from the first update: start-up time (Ray workers, model
        # building) and a resumed count would otherwise skew it. The lines' elapsed time counts
        # from here, the bar's (tqdm's own) from the first update.
        self.first: tuple[float, int] | None = None
        self.fields: dict[str, str] = {}
        self.bar = None
        if _shows_a_bar(self.stream):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=what, unit=unit, file=self.stream,
                            dynamic_ncols=True, leave=leave)
        self.last_line = time.monotonic()
        self.lined = initial

    def update(self, done: int | None = None, **fields) -> None:
        """Progress to `done` (absolute; default one more), with named values to show."""
        done = self.done + 1 if done is None else done
        if self.first is None:
            self.first = (time.monotonic(), done)
            if self.bar is not None:
                # The bar's clock starts here too: counted from construction, a demo's first
                # iteration (after Ray Train's start-up) showed an ETA of hours.
                self.bar.unpause()
        self.fields.update({k: (f"{v:.4g}" if isinstance(v, float) else str(v))
                            for k, v in fields.items()})
        if self.bar is not None:
            self.bar.update(done - self.done)
            if fields:
                self.bar.set_postfix(self.fields, refresh=False)
        self.done = done
        if self.bar is None and time.monotonic() - self.last_line >= LINE_EVERY_S:
            self._line()

    def _line(self) -> None:
        now = time.monotonic()
        elapsed = now - self.start
        since, counted = self.first or (now, self.done)
        rate = (self.done - counted) / (now - since) if now > since else 0.0
        eta = _clock((self.total - self.done) / rate) if rate > 0 else ("00:00" if self.done >= self.total else "?")
        shown = "  ".join(f"{k} {v}" for k, v in self.fields.items())
        print(f"{self.what}: {self.done}/{self.total} {self.unit} ({100 * self.done / max(self.total, 1):.0f}%)"
              f"  elapsed {_clock(elapsed)}  ETA {eta}" + (f"  {shown}" if shown else ""),
              file=self.stream, flush=True)
        self.last_line = time.monotonic()
        self.lined = self.done

    def note(self, message: str) -> None:
        """A sentence the user must see (a failed worker, a server that is down), above the bar."""
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.done != self.lined:  # the last line shows the end, once
            self._line()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
