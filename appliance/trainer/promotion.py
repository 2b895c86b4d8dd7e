"""The promotion gate: a pure decision from losses to promote-or-keep, with the reason in words."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Losses:
    base: float
    active: float | None  # None when no adapter is active
    candidate: float
    # Loss on earlier runs' validation data (the anchor), when there is any: a candidate that wins on
    # tonight's data by forgetting what was learnt before, or by learning a planted pattern, is refused.
    anchor_reference: float | None = None
    anchor_candidate: float | None = None


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    reference: str  # "active adapter" or "base model"
    improvement: float  # relative validation-loss improvement over the reference

    def to_json(self) -> dict:
        return asdict(self)


def decide(losses: Losses, margin: float, anchor_tolerance: float) -> GateDecision:
    ref_name, ref = ("active adapter", losses.active) if losses.active is not None else ("base model", losses.base)
    if not all(math.isfinite(x) for x in (ref, losses.candidate)):
        return GateDecision(False, "a validation loss is not a finite number, so nothing can be compared", ref_name, math.nan)
    improvement = (ref - losses.candidate) / ref if ref > 0 else 0.0
    if improvement < margin:
        return GateDecision(False, f"validation loss {losses.candidate:.4f} is not {margin:.1%} below the {ref_name}'s "
                                   f"{ref:.4f} (improvement {improvement:.1%})", ref_name, improvement)
    if losses.anchor_reference is not None and losses.anchor_candidate is not None:
        limit = losses.anchor_reference * (1 + anchor_tolerance)
        if not math.isfinite(losses.anchor_candidate) or losses.anchor_candidate > limit:
            return GateDecision(False, f"on earlier runs' validation data the loss rose to {losses.anchor_candidate:.4f} from "
                                       f"{losses.anchor_reference:.4f}, more than the {anchor_tolerance:.0%} tolerated", ref_name, improvement)
    return GateDecision(True, f"validation loss {losses.candidate:.4f} is {improvement:.1%} below the {ref_name}'s {ref:.4f}",
                        ref_name, improvement)
