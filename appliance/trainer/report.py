"""Run reports: runs/<id>.json under the state directory, read by the console and `appliance train`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from appliance.atomic import atomic_write_json


def write_report(runs_dir: Path, report: dict[str, Any]) -> Path:
    path = runs_dir / f"{report['id']}.json"
    atomic_write_json(path, report)
    return path


def list_reports(runs_dir: Path) -> list[dict[str, Any]]:
    """Every readable report, oldest first (ids start with a UTC timestamp)."""
    out = []
    for p in sorted(runs_dir.glob("*.json")) if runs_dir.is_dir() else []:
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            continue
    return out


def summary_line(report: dict[str, Any]) -> str:
    s = report.get("stages", {})
    ev = s.get("evaluate", {})
    parts = [f"run {report.get('id')}: {report.get('status')}"]
    if "split" in s:
        parts.append(f"{s['split']['train']} train / {s['split']['validation']} validation")
    if ev:
        parts.append("val loss base {} active {} candidate {}".format(ev.get("base"), ev.get("active"), ev.get("candidate")))
    if report.get("reason"):
        parts.append(str(report["reason"]))
    return "; ".join(parts)
