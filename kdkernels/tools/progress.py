"""A progress bar for long tool runs: tqdm when installed (the ``bench``/``demo`` extras), else a
plain line on stderr every few seconds, so the tools need no hard dependency."""
from __future__ import annotations

import sys
import time

__all__ = ["progress"]


class _Plain:
    """The few tqdm methods the tools use, printing ``desc: i/total`` at most every 5 s."""

    def __init__(self, iterable=None, total=None, desc="", disable=False, **_):
        self.iterable, self.total, self.desc, self.disable = iterable, total, desc, disable
        self.n, self.postfix, self._last = 0, "", 0.0

    def _show(self, force=False):
        now = time.monotonic()
        if self.disable or not (force or now - self._last > 5.0):
            return
        self._last = now
        total = f"/{self.total}" if self.total else ""
        print(f"{self.desc}: {self.n}{total} {self.postfix}", file=sys.stderr, flush=True)

    def update(self, k=1):
        self.n += k
        self._show()

    def set_postfix_str(self, s, refresh=True):
        self.postfix = s

    def close(self):
        self._show(force=True)

    def __iter__(self):
        for x in self.iterable:
            yield x
            self.update()


def progress(iterable=None, **kw):
    try:
        from tqdm import tqdm
    except ImportError:
        return _Plain(iterable, **kw)
    return tqdm(iterable, **kw)
