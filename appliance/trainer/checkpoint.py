"""A run's deadline and its checkpoints: training stops in time for the morning, and a killed run resumes.

The deadline is a local time of day ([trainer] deadline, "06:30"): the next one after the run starts.
Training stops once the next step would leave less than the reserve before it (the reserve: the
evaluation passes as measured in this run, plus deadline_reserve_minutes for the gate and export).

A checkpoint (LoRA weights, optimizer and schedule, step, the shuffling rng and the epoch's batch
order, the best weights so far) is written atomically every checkpoint_minutes into the trainer's
state directory. It names the run's identity: a hash of the encoded data, the settings that shape
training, the base model and the parent adapter. A run that finds a checkpoint with its own identity
resumes from it; any other is discarded with a log line.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from appliance.atomic import atomic_write_bytes
from appliance.trainer.settings import TrainerConfigError, TrainerSettings

CHECKPOINT_NAME = "checkpoint.pt"
EVAL_PASSES = 4  # validation passes the evaluation stage makes after training (base, candidate, active, anchor)
# The settings that shape what training computes (the data is hashed apart): a run resumed with another
# deadline, thread count or gate is the same run.
_IDENTITY = ("learning_rate", "epochs", "patience", "lora_rank", "lora_alpha", "lora_targets", "batch_size", "max_length",
             "seed", "dp_epsilon", "dp_noise_multiplier", "dp_max_grad_norm", "dp_delta")

Clock = Callable[[], datetime]


def local_now() -> datetime:
    return datetime.now().astimezone()


def next_deadline(hhmm: str, now: datetime) -> datetime | None:
    """The first `hhmm` (local time) after `now`; None for "" (no deadline)."""
    if not hhmm.strip():
        return None
    m = re.fullmatch(r"([01]?\d|2[0-3]):([0-5]\d)", hhmm.strip())
    if not m:
        raise TrainerConfigError(f'[trainer] deadline is {hhmm!r}; it must be a local time of day as HH:MM, e.g. "06:30".',
                                 'Correct it in appliance.toml, or set deadline = "" for no deadline.')
    at = now.replace(hour=int(m[1]), minute=int(m[2]), second=0, microsecond=0)
    return at if at > now else at + timedelta(days=1)


@dataclass
class Deadline:
    """When training must stop: `at` (None: never), less the reserve for what follows training."""

    at: datetime | None
    reserve_s: float = 0.0
    clock: Clock = local_now

    @classmethod
    def for_run(cls, settings: TrainerSettings, clock: Clock | None = None) -> Deadline:
        clock = clock or local_now
        return cls(next_deadline(settings.deadline, clock()), settings.deadline_reserve_minutes * 60.0, clock)

    def leaves_time(self, step_s: float, eval_s: float) -> bool:
        """Whether one more step of `step_s` still leaves the evaluation (`eval_s` a pass) and the reserve before `at`."""
        if self.at is None:
            return True
        return self.clock() + timedelta(seconds=step_s + EVAL_PASSES * eval_s + self.reserve_s) <= self.at

    def describe(self) -> str:
        return "none" if self.at is None else self.at.strftime("%H:%M")


def identity(train: list[Any], val: list[Any], settings: TrainerSettings, base_sha: str, parent: str | None) -> str:
    """What a checkpoint must match to be resumed: the encoded data, the training settings, the base, the parent."""
    h = hashlib.sha256()
    shaping = {k: getattr(settings, k) for k in _IDENTITY}
    h.update(json.dumps({"settings": shaping, "base": base_sha, "parent": parent}, sort_keys=True).encode())
    for part in (train, val):
        h.update(b"\x00part")
        for e in part:
            h.update(json.dumps([e.input_ids, e.labels]).encode())
    return h.hexdigest()


@dataclass
class LoopState:
    """Where a training loop is; everything in it goes into a checkpoint."""

    epoch: int = 0
    order: list[list[int]] = field(default_factory=list)  # this epoch's batches; empty: not drawn yet
    pos: int = 0  # the next batch of `order`
    steps: int = 0
    tokens: int = 0
    best: float = math.inf
    bad_evals: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    rng: list[Any] = field(default_factory=list)  # random.Random.getstate() after drawing `order`
    stopped_early: bool = False
    best_state: dict[str, Any] | None = None


class Checkpointer:
    """Saves and finds the checkpoint of one run's identity in `directory`; only the main rank writes."""

    def __init__(self, directory: Path, ident: str, every_s: float, log: Callable[[str], None], main: bool = True,
                 timer: Callable[[], float] = time.monotonic) -> None:
        self.path, self.ident, self.every_s, self.log, self.main, self.timer = directory / CHECKPOINT_NAME, ident, every_s, log, main, timer
        self.last = timer()

    def load(self) -> dict[str, Any] | None:
        """The saved checkpoint of this identity; another one (other data or settings) is discarded."""
        import torch

        try:
            blob = torch.load(io.BytesIO(self.path.read_bytes()), weights_only=True)
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001 - a torn or foreign file is discarded, never trusted
            self._discard(f"unreadable ({type(e).__name__})")
            return None
        if not isinstance(blob, dict) or blob.get("identity") != self.ident:
            self._discard("made for other data or settings")
            return None
        return blob

    def due(self) -> bool:
        return self.timer() - self.last >= self.every_s

    def save(self, state: LoopState, model_state: dict[str, Any], opt: Any, sched: Any) -> None:
        import torch

        self.last = self.timer()
        if not self.main:
            return
        buf = io.BytesIO()
        torch.save({"identity": self.ident, "loop": asdict(state), "lora": model_state, "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "saved_at": local_now().isoformat()}, buf)
        atomic_write_bytes(self.path, buf.getvalue(), 0o600)

    def clear(self) -> None:
        if self.main:
            self.path.unlink(missing_ok=True)

    def _discard(self, why: str) -> None:
        self.log(f"checkpoint {self.path} {why}: discarded, training starts from the beginning")
        self.clear()


def lora_state(model: Any) -> dict[str, Any]:
    """A copy of the trainable (LoRA) weights."""
    return {n: t.detach().clone() for n, t in model.named_parameters() if t.requires_grad}


def load_weights(model: Any, state: dict[str, Any] | None) -> None:
    import torch

    if state is not None:
        named = dict(model.named_parameters())
        with torch.no_grad():
            for n, v in state.items():
                named[n].copy_(v)


def resume(checkpoint: Checkpointer, model: Any, opt: Any, sched: Any, world: Any, total: int) -> LoopState | None:
    """Put the model, optimizer and schedule where this run's checkpoint left them; its loop state (None: none)."""
    blob = checkpoint.load()
    world.barrier()  # every rank has read it before the main rank writes the next one
    if blob is None:
        return None
    load_weights(model, blob["lora"])
    opt.load_state_dict(blob["optimizer"])
    sched.load_state_dict(blob["scheduler"])
    state = LoopState(**blob["loop"])
    checkpoint.log(f"resuming from the checkpoint at step {state.steps}/{total} (saved {blob.get('saved_at', '?')})")
    return state


def tuple_state(x: Any) -> Any:
    """random.getstate() is nested tuples; a checkpoint may hold lists."""
    return tuple(tuple_state(v) for v in x) if isinstance(x, list | tuple) else x


def clear_checkpoint(directory: Path) -> None:
    """After the run's adapter is registered, its checkpoint has served."""
    (directory / CHECKPOINT_NAME).unlink(missing_ok=True)


def controls(directory: Path, settings: TrainerSettings, train: list[Any], val: list[Any], base_sha: str, parent: str | None,
             main: bool, log: Callable[[str], None], clock: Clock | None = None) -> dict[str, Any]:
    """train_lora's checkpoint and deadline for a run of the pipeline."""
    deadline = Deadline.for_run(settings, clock)
    log(f"deadline {deadline.describe()}; a checkpoint every {settings.checkpoint_minutes:g} min in {directory}")
    ckpt = Checkpointer(directory, identity(train, val, settings, base_sha, parent), settings.checkpoint_minutes * 60.0, log, main)
    return {"checkpoint": ckpt, "deadline": deadline}


def finish(directory: Path, report: dict[str, Any], result: Any) -> None:
    """Once the adapter is registered the checkpoint has served; the report's reason says how training ended."""
    clear_checkpoint(directory)
    notes = []
    if result.resumed_at_step is not None:
        notes.append(f"resumed from the checkpoint at step {result.resumed_at_step} of {result.planned_steps}")
    if result.stopped_at_deadline:
        notes.append(f"stopped at the deadline after {result.steps} of {result.planned_steps} steps")
    if result.privacy:
        report["privacy"] = result.privacy
        notes.append(f"differentially private (ε = {result.privacy['epsilon']:g}, δ = {result.privacy['delta']:.3g})")
    if notes:
        report["reason"] = "; ".join(notes) + (f"; {report['reason']}" if report.get("reason") else "")
