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

from appliance.paths import Layout

TRAINER_SERVICE = "appliance-trainer.service"


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
    examples: int | None
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
    try:
        r = json.loads(path.read_text())
        if not isinstance(r, dict):
            raise ValueError("not an object")
    except (OSError, ValueError) as e:
        return RunRow(path.stem, "", None, None, None, None, None, None, "", error=f"unreadable report: {e}")
    counts = r.get("counts") or {}
    losses = r.get("losses") or {}
    examples = next((counts[k] for k in ("train", "trained", "examples", "valid", "collected") if isinstance(counts.get(k), int)), None)
    masked = _get(r, "counts", "pii_masked")
    if not isinstance(masked, int):
        masked = _get(r, "pii", "masked")
    history = r.get("history") or r.get("curve") or []
    return RunRow(
        id=str(r.get("id", path.stem)),
        date=str(r.get("finished_at") or r.get("started_at") or "")[:19].replace("T", " "),
        examples=examples, pii_masked=masked if isinstance(masked, int) else None,
        base_loss=_num(losses.get("base")), active_loss=_num(losses.get("active")), candidate_loss=_num(losses.get("candidate")),
        promoted=_get(r, "gate", "promote") if isinstance(_get(r, "gate", "promote"), bool) else None,
        reason=str(_get(r, "gate", "reason") or r.get("error") or r.get("status") or ""),
        curve=_curve(history, "loss"), val_curve=_curve(history, "val_loss"),
    )


def load_runs(layout: Layout) -> list[RunRow]:
    """Every run report, newest first."""
    d = runs_dir(layout)
    if not d.is_dir():
        return []
    rows = [read_run(p) for p in d.glob("*.json") if not p.name.startswith(".")]
    return sorted(rows, key=lambda r: (r.date, r.id), reverse=True)


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
            self.runner.run(["systemctl", "start", "--no-block", TRAINER_SERVICE])
            return f"started {TRAINER_SERVICE}; follow it on the Logs screen"
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
