"""A progress display for long probe loops, dependency-free (tqdm is used when installed).

``progress=None`` (the default of the public calls) shows a bar only once a loop has run
longer than :data:`AUTO_AFTER_S` seconds, so short calls stay silent; ``True`` always
shows it, ``False`` never.
"""

from __future__ import annotations

import sys
import time

__all__ = ["Progress", "AUTO_AFTER_S"]

AUTO_AFTER_S = 3.0
_PLAIN = object()  # marker: no tqdm, print plain lines


class Progress:
    """``update(n)`` after each unit of work; ``close()`` at the end. ``total`` may be None."""

    def __init__(self, total: int | None, desc: str, enabled: bool | None = None, unit: str = "hvp"):
        self.total = total
        self.desc = desc
        self.enabled = enabled
        self.unit = unit
        self.n = 0
        self.t0 = time.perf_counter()
        self._bar = None
        self._last_print = 0.0
        if enabled:
            self._open()

    def _open(self) -> None:
        try:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=self.desc, unit=self.unit, initial=self.n, leave=False,
                              mininterval=0.1 if sys.stderr.isatty() else 5.0)
        except ImportError:
            self._bar = _PLAIN

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        if self.enabled is False:
            return
        now = time.perf_counter()
        if self._bar is None:
            if self.enabled is None and now - self.t0 > AUTO_AFTER_S:
                self._open()  # starts at self.n, which already counts this update
            return
        if self._bar is _PLAIN:
            if now - self._last_print >= 1.0:
                self._last_print = now
                tot = f"/{self.total}" if self.total else ""
                extra = " ".join(f"{k}={v}" for k, v in postfix.items())
                sys.stderr.write(f"\r{self.desc}: {self.n}{tot} {self.unit}s {now - self.t0:.1f}s {extra}")
                sys.stderr.flush()
        else:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self._bar is _PLAIN:
            sys.stderr.write("\n")
        elif self._bar is not None:
            self._bar.close()
        self._bar = None
