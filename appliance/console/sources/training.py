"""Trainer run reports (`runs/<id>.json` under the state directory) and "train now".

The reader is tolerant: a report missing a field shows a dash, a damaged file shows as damaged;
the console never rewrites a report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.paths import TRAINER_UNIT, Layout


def runs_dir(layout: Layout) -> Path:
    return layout.var / "runs"


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


@dataclass(frozen=True)
class RunRow:
    id: str
    date: str
    status: str  # promoted | kept | skipped | failed | running (the trainer's report status)
    examples: int | None  # trained on plus validated on
    pii_masked: int | None
    base_loss: float | None
    active_loss: float | None
    candidate_loss: float | None
    promoted: bool | None
    reason: str
    curve: tuple[tuple[float, float], ...] = ()  # (step, training loss)
    val_curve: tuple[tuple[float, float], ...] = ()  # (step, validation loss)
    error: str = ""


def _curve(points: Any, key: str) -> tuple[tuple[float, float], ...]:
    out = []
    for i, p in enumerate(points if isinstance(points, list) else []):
        if isinstance(p, dict) and _num(p.get(key)) is not None:
            out.append((_num(p.get("step")) or float(i), float(p[key])))
    return tuple(out)


def read_run(path: Path) -> RunRow:
    """One report as appliance/trainer/run.py writes it: id, started_at, finished_at, status, reason and
    stages (split, pii, train.history, evaluate, gate)."""
    try:
        r = json.loads(path.read_text())
        if not isinstance(r, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as e:
        return RunRow(path.stem, "", "unreadable", None, None, None, None, None, None, "", error=f"unreadable report: {e}")
    split = _get(r, "stages", "split") or {}
    sizes: list[int] = [v for v in (split.get(k) for k in ("train", "validation")) if isinstance(v, int)]
    masked = _get(r, "stages", "pii", "masked")
    ev = _get(r, "stages", "evaluate") or {}
    promote = _get(r, "stages", "gate", "promote")
    history = _get(r, "stages", "train", "history") or []
    return RunRow(
        id=str(r.get("id", path.stem)),
        date=str(r.get("finished_at") or r.get("started_at") or "")[:19].replace("T", " "),
        status=str(r.get("status") or ""),
        examples=sum(sizes) if len(sizes) == 2 else None,
        pii_masked=sum(v for v in masked.values() if isinstance(v, int)) if isinstance(masked, dict) else None,
        base_loss=_num(ev.get("base")), active_loss=_num(ev.get("active")), candidate_loss=_num(ev.get("candidate")),
        promoted=promote if isinstance(promote, bool) else None,
        reason=str(r.get("reason") or _get(r, "stages", "gate", "reason") or ""),
        curve=_curve(history, "train_loss"), val_curve=_curve(history, "val_loss"),
    )


def load_runs(layout: Layout) -> list[RunRow]:
    """Every run report, newest first."""
    d = runs_dir(layout)
    if not d.is_dir():
        return []
    rows = [read_run(p) for p in d.glob("*.json") if not p.name.startswith(".")]
    return sorted(rows, key=lambda r: (r.date, r.id), reverse=True)


def last_run(layout: Layout) -> RunRow | None:
    """The newest report only (run ids start with a UTC timestamp): cheap enough for the dashboard's poll."""
    d = runs_dir(layout)
    names = sorted(p.name for p in d.glob("*.json") if not p.name.startswith(".")) if d.is_dir() else []
    return read_run(d / names[-1]) if names else None


@dataclass
class Trainer:
    """Starts a run: through systemd where it runs (the unit's priority and sandbox apply), otherwise
    `appliance train --now` as a child process with its output in a log file."""

    layout: Layout
    runner: Any
    systemd: bool
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    log: Path | None = None

    def start(self) -> str:
        if self.systemd:
            self.runner.run(["systemctl", "start", "--no-block", TRAINER_UNIT])
            return f"started {TRAINER_UNIT}; follow it on the Logs screen"
        if self.running():
            return f"a training run is already going (pid {self.proc.pid})"  # type: ignore[union-attr]
        self.log = self.layout.log_dir / "console-train.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "appliance.cli", "train", "--now", "--root", str(self.layout.root)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        return f"started `appliance train --now` (pid {self.proc.pid}); output in {self.log}"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def finished(self) -> tuple[int, str] | None:
        """(exit code, last line of output) once a child run ended; None while running or when none was started."""
        if self.proc is None or self.proc.poll() is None:
            return None
        rc, self.proc = self.proc.returncode, None
        tail = ""
        if self.log and self.log.is_file():
            lines = self.log.read_text(errors="replace").strip().splitlines()
            tail = lines[-1] if lines else ""
        return rc, tail
