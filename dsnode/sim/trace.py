"""One line per event: ``tick node event detail``. Kept in a bounded ring
unless ``full``; printed for a failing seed."""

from __future__ import annotations

from collections import deque


class Trace:
    def __init__(self, enabled: bool = False, keep: int = 400, echo: bool = False) -> None:
        self.enabled = enabled
        self.echo = echo
        self.lines: deque[str] = deque(maxlen=None if echo else keep)

    def __call__(self, tick: int, node: str, event: str, detail: str = "") -> None:
        if not self.enabled:
            return
        line = f"{tick:6d} {node:>4} {event:<12} {detail}"
        if self.echo:
            print(line)
        self.lines.append(line)

    def tail(self) -> str:
        return "\n".join(self.lines)
