"""Replay: earlier runs' training examples mixed into each run's training split, so what the site
taught on earlier nights is not forgotten when tonight's data is about something else.

The store (trainer/replay.jsonl) holds examples as they were trained on: masked, deduplicated,
newest last, at most STORE_MAX. Only training examples go in: earlier validation examples are the
anchor the gate scores, and must stay unseen, and this run's validation split never gets replayed
ones. An example whose question a later run answers otherwise (a correction) leaves the store in
that run, so the old answer is never trained again beside the new one. Pure: values in, values out;
state.py reads and writes the file.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any

from appliance.trainer.data import Example
from appliance.trainer.dedupe import answer_text, cap_answers, cap_senders, signature, without_corrected
from appliance.trainer.settings import TrainerSettings

STORE_MAX = 5000  # examples kept for replay: about 100 nights of 50 new examples


@dataclass(frozen=True)
class Replay:
    mixed: list[Example]  # earlier examples added to this run's training split
    store: list[Example]  # the store as this run leaves it (written when the run consumes its data)
    stored: int  # examples in the store before this run
    superseded: int  # of those, dropped because this run answers their question otherwise
    capped: int  # drawn but left out: their answer or their sender had its share of the run already

    def outside(self, evaluation: Any) -> list[Example]:
        """The mixed examples less any whose prompt the outcome gate asks (an EvalSet's `items`): the
        gate's items are never trained on."""
        asked = {x.prompt_key for x in getattr(evaluation, "items", [])}
        return [e for e in self.mixed if e.prompt_key not in asked]

    def counts(self) -> dict[str, int]:
        return {"stored": self.stored, "superseded": self.superseded, "mixed": len(self.mixed), "capped": self.capped,
                "store_after": len(self.store)}


def _rng(fresh: list[Example], seed: int) -> random.Random:
    """Seeded by this run's data: every rank of a multi-GPU run draws the same examples."""
    digest = hashlib.sha256("\n".join([str(seed), *sorted(e.key for e in fresh)]).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def wanted(fresh_train: int, fraction: float, limit: int) -> int:
    """Earlier examples for `fresh_train` new ones, so that they make `fraction` of the training split."""
    return min(limit, round(fresh_train * fraction / (1 - fraction))) if fraction > 0 else 0


def plan(stored: list[Example], fresh: list[Example], fresh_train: list[Example], settings: TrainerSettings) -> Replay:
    """What this run replays from `stored`, and the store after it. `fresh` is every example this run
    kept (training and validation): a stored example whose question one of them answers otherwise is
    superseded; `fresh_train` is this run's training split, which the store gains."""
    kept = without_corrected(stored, fresh, settings.near_duplicate_threshold)
    new_keys = {e.key for e in fresh}
    candidates = [e for e in kept if e.key not in new_keys]
    n = min(wanted(len(fresh_train), settings.replay_fraction, settings.replay_max), len(candidates))
    drawn = _rng(fresh, settings.seed).sample(candidates, n)
    mixed = _within_caps(drawn, fresh_train, settings)
    return Replay(mixed, _bounded(kept + fresh_train), len(stored), len(stored) - len(kept), len(drawn) - len(mixed))


def _bounded(examples: list[Example]) -> list[Example]:
    """One copy of each example, in the place of its newest, the newest STORE_MAX."""
    seen: set[str] = set()
    out = []
    for e in reversed(examples):
        if e.key not in seen:
            seen.add(e.key)
            out.append(e)
    return out[::-1][-STORE_MAX:]


def _within_caps(drawn: list[Example], fresh_train: list[Example], settings: TrainerSettings) -> list[Example]:
    """The drawn examples that keep every answer and every sender within its cap for the whole split
    (new examples first): a flood cut to its cap night after night must not come back through replay."""
    if not drawn:
        return []
    both = drawn + fresh_train  # the caps keep the newest, the end of the list: new examples win
    order = cap_answers(list(range(len(both))), [signature(answer_text(e)) for e in both], settings.max_per_answer,
                 settings.near_duplicate_threshold)
    order = cap_senders(order, [both[i].sender for i in order], settings.max_per_source)
    return [both[i] for i in order if i < len(drawn)]
