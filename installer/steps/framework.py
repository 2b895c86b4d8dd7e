"""Named, idempotent install steps that report progress as events; the CLI prints them, the console renders them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from appliance.errors import ApplianceError

STATUSES = ("start", "progress", "done", "skipped", "failed")


@dataclass(frozen=True)
class StepEvent:
    step: str
    status: str  # one of STATUSES
    message: str = ""
    fraction: float | None = None  # 0..1 while in progress, when known

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "status": self.status, "message": self.message, "fraction": self.fraction}


Emit = Callable[[StepEvent], None]


class Skip(Exception):
    """Raised by a step whose work is already done (or does not apply): the event says why."""


@dataclass(frozen=True)
class Step:
    name: str
    description: str
    run: Callable[[Any, Callable[[str, float | None], None]], str | None]
    # run(ctx, progress) -> message for the done event; raises Skip("why") when nothing is to do

    def __call__(self, ctx: Any, progress: Callable[[str, float | None], None]) -> str | None:
        return self.run(ctx, progress)


def step(name: str, description: str) -> Callable[[Callable[..., str | None]], Step]:
    """Declare a step where its code is: `@step("plan", "probe the hardware and choose a tier")`."""
    def declare(run: Callable[..., str | None]) -> Step:
        return Step(name, description, run)
    return declare


def run_steps(steps: Sequence[Step], ctx: Any, emit: Emit) -> None:
    """Run each step in order; the first failure emits `failed` and propagates."""
    for step in steps:
        emit(StepEvent(step.name, "start", step.description))

        def progress(message: str, fraction: float | None = None, _name: str = step.name) -> None:
            emit(StepEvent(_name, "progress", message, fraction))

        try:
            message = step.run(ctx, progress)
        except Skip as s:
            emit(StepEvent(step.name, "skipped", str(s)))
            continue
        except ApplianceError as e:
            emit(StepEvent(step.name, "failed", e.message))
            raise
        except BaseException as e:
            emit(StepEvent(step.name, "failed", f"{type(e).__name__}: {e}"))
            raise
        emit(StepEvent(step.name, "done", message or ""))


def print_events(stream: Any, verbose: bool = False) -> Emit:
    """An emitter for a terminal: one line per finished step, progress only when verbose."""
    marks = {"done": "ok  ", "skipped": "skip", "failed": "FAIL"}

    def emit(e: StepEvent) -> None:
        if e.status == "start":
            print(f"==> {e.step}: {e.message}", file=stream, flush=True)
        elif e.status == "progress":
            if verbose or e.fraction is None:
                pct = f" {e.fraction:4.0%}" if e.fraction is not None else ""
                print(f"    {e.message}{pct}", file=stream, flush=True)
        else:
            print(f"    {marks[e.status]} {e.message}".rstrip(), file=stream, flush=True)

    return emit
