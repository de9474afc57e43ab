"""Progress of a long job: a tqdm bar on a terminal, plain periodic lines otherwise (logs, CI)."""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

__all__ = ["Progress"]


class Progress:
    """``update(done, skipped)`` after every batch; ``close()`` at the end. ``mode``: "auto" (a bar when
    ``stream`` is a terminal and tqdm is installed, else lines), "bar", "lines" or "off"."""

    def __init__(self, total: int, *, stream: Optional[TextIO] = None, mode: str = "auto",
                 interval: float = 10.0, desc: str = "images"):
        self.total, self.stream, self.interval, self.desc = total, stream or sys.stderr, interval, desc
        self.start = self.last = time.perf_counter()
        self.done = self.skipped = 0
        self.bar = None
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else "lines"
        if mode == "bar":
            try:
                from tqdm import tqdm
            except ImportError:
                mode = "lines"  # tqdm comes with the `offline` extra
            else:
                self.bar = tqdm(total=total, unit="img", desc=desc, file=self.stream, dynamic_ncols=True)
        self.mode = mode

    def update(self, done: int, skipped: int = 0) -> None:
        self.done += done
        self.skipped += skipped
        if self.bar is not None:
            self.bar.update(done + skipped)
            if skipped:
                self.bar.set_postfix(skipped=self.skipped, refresh=False)
        elif self.mode == "lines":
            now = time.perf_counter()
            if now - self.last >= self.interval:
                self.last = now
                self.stream.write(self.line(now) + "\n")
                self.stream.flush()

    def line(self, now: Optional[float] = None) -> str:
        elapsed = (now or time.perf_counter()) - self.start
        seen = self.done + self.skipped
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = self.total - seen
        eta = f"{left / (seen / elapsed):.0f} s" if seen and elapsed > 0 else "?"
        pct = f" ({seen / self.total:.0%})" if self.total else ""
        return (f"{seen}/{self.total} {self.desc}{pct}, {rate:.1f} images/s, ETA {eta}"
                + (f", {self.skipped} skipped" if self.skipped else ""))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
