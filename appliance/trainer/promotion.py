"""The promotion gate: a pure decision from outcomes (answers scored item by item) to promote-or-keep.

The candidate must answer held-out questions better than the reference (the active adapter, or the
base model when none is active): by a margin on the mean score, significantly over the same items
(exact sign test), and turning at most a few right answers wrong. On a fixed set of generic prompts
it must stay close to the base model's own answers and must not fall into repetition. Validation
losses are reported beside it for information; only the loss on earlier runs' validation data
still blocks (a candidate that forgets what was taught before).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from appliance.trainer.scoring import mean, sign_test


@dataclass(frozen=True)
class Losses:
    base: float
    active: float | None  # None when no adapter is active
    candidate: float
    # Loss on earlier runs' validation data (the anchor), when there is any.
    anchor_reference: float | None = None
    anchor_candidate: float | None = None


@dataclass(frozen=True)
class Item:
    """One held-out example: its prompt (an excerpt, for the report) and both answers' scores in [0, 1]."""

    prompt: str
    reference: float
    candidate: float


@dataclass(frozen=True)
class Anchor:
    """The candidate on the generic prompts, against the base model's own greedy answers."""

    agreement: float  # mean token F1 between the candidate's answers and the base's
    repetition: float  # mean share of repeated word 3-grams in the candidate's answers
    base_repetition: float
    worst: str = ""  # excerpt of the candidate's most repetitive answer


@dataclass(frozen=True)
class Outcome:
    reference: str  # "active adapter" or "base model"
    items: tuple[Item, ...]
    anchor: Anchor | None
    source: str = ""  # where the items came from: "inbox/eval" or "held back"
    error: str = ""  # why the candidate could not be evaluated at all


@dataclass(frozen=True)
class GateRules:
    margin: float  # mean-score improvement needed (absolute, 0.02 = 2 points)
    max_p: float  # the sign test's p must be below this
    max_broken: int  # items right for the reference that the candidate may get wrong
    right_at: float  # an item with at least this score counts as answered right
    min_agreement: float  # anchor: least mean agreement with the base model's answers
    max_repetition: float  # anchor: most mean repetition (or the base model's own, where that is higher)
    anchor_tolerance: float  # earlier runs' validation loss may rise this much (relative)


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    reference: str
    improvement: float  # candidate's mean score minus the reference's
    scores: dict[str, float] = field(default_factory=dict)
    p_value: float = 1.0
    items: int = 0
    fixed: list[str] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    anchor: dict[str, Any] | None = None
    losses: dict[str, float | None] = field(default_factory=dict)
    source: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _loss_check(losses: Losses | None, tolerance: float) -> tuple[bool, str]:
    if losses is None or losses.anchor_reference is None or losses.anchor_candidate is None:
        return True, "no earlier runs' validation data"
    limit = losses.anchor_reference * (1 + tolerance)
    if not math.isfinite(losses.anchor_candidate) or losses.anchor_candidate > limit:
        return False, (f"on earlier runs' validation data the loss rose to {losses.anchor_candidate:.4f} from "
                       f"{losses.anchor_reference:.4f}, more than the {tolerance:.0%} tolerated")
    return True, f"earlier runs' validation loss {losses.anchor_candidate:.4f} (reference {losses.anchor_reference:.4f})"


def _anchor_checks(a: Anchor | None, rules: GateRules) -> list[tuple[str, bool, str]]:
    if a is None:
        return [("anchor", False, "the generic prompts were not answered, so general ability cannot be checked")]
    rep_limit = max(rules.max_repetition, a.base_repetition)
    return [
        ("repetition", a.repetition <= rep_limit,
         f"on the generic prompts {a.repetition:.0%} of the candidate's word 3-grams repeat (the base model's: "
         f"{a.base_repetition:.0%}, at most {rep_limit:.0%} allowed)" + (f", e.g. \"{a.worst}\"" if a.worst else "")),
        ("agreement", a.agreement >= rules.min_agreement,
         f"on the generic prompts the candidate's answers agree {a.agreement:.0%} with the base model's "
         f"(at least {rules.min_agreement:.0%} needed)"),
    ]


def decide(outcome: Outcome, losses: Losses | None, rules: GateRules) -> GateDecision:
    """Promote only when every check passes; the reason is the first that failed (or the win, in words)."""
    items = outcome.items
    ref, cand = mean([i.reference for i in items]), mean([i.candidate for i in items])
    improvement = cand - ref
    wins = sum(i.candidate > i.reference for i in items)
    defeats = sum(i.candidate < i.reference for i in items)
    p = sign_test(wins, defeats)
    fixed = [i.prompt for i in items if i.candidate >= rules.right_at > i.reference]
    broken = [i.prompt for i in items if i.reference >= rules.right_at > i.candidate]
    name = outcome.reference
    checks: list[tuple[str, bool, str]] = [
        ("evaluation", not outcome.error, outcome.error or "the candidate answered through the serving engine"),
        ("items", bool(items), f"{len(items)} held-out items answered" if items else
         "there is no held-out item to judge the candidate on; drop a frozen set in inbox/eval/ or add more data"),
        *_anchor_checks(outcome.anchor, rules),
        ("broken", len(broken) <= rules.max_broken,
         f"{len(broken)} items the {name} answered right are wrong now (at most {rules.max_broken} allowed)"),
        ("margin", improvement >= rules.margin,
         f"outcome score {cand:.3f} against the {name}'s {ref:.3f}: {improvement:+.3f}, "
         f"{'at least' if improvement >= rules.margin else 'not'} the {rules.margin:.3f} margin"),
        ("significance", p < rules.max_p,
         f"better on {wins} items, worse on {defeats}: sign test p = {p:.3g} "
         f"({'below' if p < rules.max_p else 'not below'} {rules.max_p:g})"),
        ("earlier_runs", *_loss_check(losses, rules.anchor_tolerance)),
    ]
    failed = [detail for _, ok, detail in checks if not ok]
    if failed:
        reason = failed[0]
    else:
        reason = (f"outcome score {cand:.3f} beats the {name}'s {ref:.3f} by {improvement:.3f} over {len(items)} items "
                  f"(fixed {len(fixed)}, broken {len(broken)}, sign test p = {p:.3g})")
    return GateDecision(
        promote=not failed, reason=reason, reference=name, improvement=round(improvement, 6),
        scores={"reference": round(ref, 6), "candidate": round(cand, 6)}, p_value=p, items=len(items),
        fixed=fixed, broken=broken, checks=[{"check": c, "passed": ok, "detail": d} for c, ok, d in checks],
        anchor=asdict(outcome.anchor) if outcome.anchor else None,
        losses={k: (v if v is None or math.isfinite(v) else None) for k, v in asdict(losses).items()} if losses else {},
        source=outcome.source)
