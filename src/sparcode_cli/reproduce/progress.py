"""One live overview of the matrix (done, running, left, time so far) instead of a scroll of logs.

On a terminal: a rich Live table, refreshed in the background, one row per training run plus one line for the
evaluation phase. Elsewhere (make's output piped to a file): one line per finished job. Each run's own log
stays in its run folder (train.log).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

STYLE = {
    "done": "green",
    "reused": "green",
    "running": "bold yellow",
    "queued": "dim",
    "failed": "bold red",
    "skipped": "magenta",
}
_STEP = re.compile(r"\bstep\s+(\d+)")


def fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@dataclass
class Row:
    """What the overview shows about one job."""

    name: str
    status: str = "queued"  # queued | running | done | reused | failed | skipped
    started: float | None = None
    ended: float | None = None
    note: str = ""
    log: Path | None = None  # train.log of a running run: its last "step N" is shown
    budget: int = 0

    def elapsed(self) -> float | None:
        if self.started is None:
            return None
        return (self.ended or time.monotonic()) - self.started

    def step(self) -> str:
        if self.status != "running" or self.log is None or not self.log.is_file():
            return ""
        try:
            tail = self.log.read_bytes()[-2000:].decode("utf-8", "replace")
        except OSError:
            return ""
        steps = _STEP.findall(tail)
        if not steps:
            return "starting"
        return f"step {steps[-1]}" + (f"/{self.budget}" if self.budget else "")


@dataclass
class Overview:
    title: str
    console: Console
    rows: dict[str, Row] = field(default_factory=dict)
    phase: str = "train"
    evals_total: int = 0
    evals_done: int = 0
    evals_reused: int = 0
    eval_current: str = ""
    t0: float = field(default_factory=time.monotonic)
    _live: Live | None = None

    # ---- updates
    def add(self, name: str, budget: int = 0) -> Row:
        self.rows[name] = Row(name, budget=budget)
        return self.rows[name]

    def set(self, name: str, status: str, note: str = "", log: Path | None = None) -> None:
        r = self.rows[name]
        now = time.monotonic()
        if status == "running":
            r.started = now
        elif status in ("done", "failed") and r.started is not None:
            r.ended = now
        r.status, r.note = status, note or r.note
        if log is not None:
            r.log = log
        if self._live is None and status in ("done", "failed", "skipped"):
            self.console.print(
                f"[{self.counts()}] {name}: {status} {fmt_s(r.elapsed())} {r.note}",
                highlight=False,
                markup=False,
            )

    def eval_step(self, name: str, reused: bool = False, failed: str = "") -> None:
        self.evals_done += 1
        self.evals_reused += int(reused)
        self.eval_current = name
        if self._live is None and not reused:
            msg = f"failed: {failed}" if failed else "done"
            self.console.print(
                f"[eval {self.evals_done}/{self.evals_total}] {name}: {msg}", highlight=False, markup=False
            )

    # ---- rendering
    def counts(self) -> str:
        st = [r.status for r in self.rows.values()]
        done = st.count("done") + st.count("reused")
        parts = [
            f"train {done}/{len(st)} done ({st.count('reused')} reused)",
            f"{st.count('running')} running",
            f"{st.count('queued')} left",
        ]
        if st.count("failed"):
            parts.append(f"{st.count('failed')} failed")
        if st.count("skipped"):
            parts.append(f"{st.count('skipped')} skipped")
        parts.append(f"eval {self.evals_done}/{self.evals_total}")
        parts.append(f"elapsed {fmt_s(time.monotonic() - self.t0)}")
        return " · ".join(parts)

    def render(self) -> Group:
        table = Table(title=self.title, title_justify="left", expand=False, show_edge=False, pad_edge=False)
        table.add_column("run")
        table.add_column("status")
        table.add_column("time", justify="right")
        table.add_column("progress / result", overflow="fold")
        for r in self.rows.values():
            info = r.step() or r.note
            table.add_row(r.name, Text(r.status, style=STYLE.get(r.status, "")), fmt_s(r.elapsed()), info)
        lines = [table, Text(self.counts(), style="bold")]
        if self.phase == "eval":
            lines.append(Text(f"evaluating: {self.eval_current}", style="yellow"))
        elif self.phase == "report":
            lines.append(Text("writing the report", style="yellow"))
        return Group(*lines)

    def __enter__(self) -> Overview:
        if self.console.is_terminal:
            self._live = Live(
                get_renderable=self.render, console=self.console, refresh_per_second=2, transient=False
            )
            self._live.__enter__()
        else:
            self.console.print(f"{self.title}: {len(self.rows)} training runs, {self.evals_total} cells")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)
            self._live = None
        else:
            self.console.print(self.counts(), highlight=False)
