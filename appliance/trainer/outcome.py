"""The outcome evaluation: greedy answers through the engine that serves, scored item by item.

The candidate is judged as the site will meet it: on llama.cpp tiers its exported GGUF adapter on
the base GGUF, on transformers tiers its PEFT adapter, both through appliance.engines, the code the
server runs. The items are a site's own frozen set (`inbox/eval/*.jsonl`, read each run, never
trained on, never moved) or, without one, a slice of tonight's data held back from training and
validation. The general-ability anchor asks the generic prompts of anchor_prompts.py; the base
model's own answers to them, and to the items while no adapter is active, are computed once per base
model and kept in the trainer's state (base_answers.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from appliance.adapters import Adapter
from appliance.config import ModelConfig, validate_section
from appliance.paths import Layout
from appliance.pii import mask_text
from appliance.trainer.anchor_prompts import PROMPTS
from appliance.trainer.base_answers import base_answers
from appliance.trainer.data import Example, Rejected, check_record
from appliance.trainer.promotion import Anchor, GateRules, Item, Outcome
from appliance.trainer.scoring import mean, repetition_rate, score_answer, token_f1
from appliance.trainer.settings import TrainerConfigError, TrainerSettings, read_toml
from appliance.trainer.split import Split, hold_back

EVAL_DIR = "eval"  # under the inbox
EXCERPT = 80
GENERATION_TIMEOUT = 600.0  # seconds one answer may take on a busy CPU


@dataclass(frozen=True)
class EvalSet:
    items: list[Example]
    source: str  # "inbox/eval" or "held back"
    files: list[str]
    rejected: list[Rejected]

    def summary(self) -> dict[str, Any]:
        return {"source": self.source, "items": len(self.items), "files": self.files, "rejected": len(self.rejected),
                "rejected_lines": [{"source": r.source, "reason": r.reason} for r in self.rejected[:20]],
                "keyed": sum(bool(x.answer_keys) for x in self.items)}


def load_frozen(inbox: Path) -> tuple[list[Example], list[str], list[Rejected]]:
    """Every valid line of inbox/eval/*.jsonl (name order); a bad line is skipped and named, never fatal."""
    folder = inbox / EVAL_DIR
    files = sorted(p for p in folder.glob("*.jsonl") if p.is_file()) if folder.is_dir() else []
    items, rejected = [], []
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                source = f"inbox/{EVAL_DIR}/{path.name}:{n}"
                try:
                    ex = check_record(json.loads(line))
                except ValueError as e:  # JSONDecodeError is one
                    rejected.append(Rejected(source, str(e)))
                    continue
                items.append(Example(ex.messages, source, ex.answer_keys))
    return items, [p.name for p in files], rejected


def cap(items: list[Example], max_items: int) -> list[Example]:
    """At most `max_items`, the same ones every run (by prompt hash), one per prompt."""
    seen: dict[str, Example] = {}
    for x in sorted(items, key=lambda e: (e.prompt_key, e.key)):
        seen.setdefault(x.prompt_key, x)
    return list(seen.values())[:max_items]


def excerpt(ex: Example) -> str:
    """The last user message, masked and cut, to name an item in the report."""
    text = " ".join(next((c for r, c in reversed(ex.messages) if r == "user"), "").split())
    text = mask_text(text)
    return text if len(text) <= EXCERPT else text[:EXCERPT - 1] + "…"


def model_config(layout: Layout) -> ModelConfig:
    """[model] of appliance.toml, checked by the validator the server uses."""
    table = read_toml(layout.config_file).get("model")
    return validate_section(ModelConfig, "model", table if isinstance(table, dict) else {},  # type: ignore[no-any-return]
                            f"[model] in {layout.config_file}:", TrainerConfigError)


class _Answerer:
    """Greedy answers from one engine, several at once (the engine batches them)."""

    def __init__(self, engine: Any, max_tokens: int) -> None:
        from appliance.engines.scheduler import SamplingParams

        self.engine = engine
        self.params = {on: SamplingParams(max_tokens=max_tokens, temperature=0.0, use_adapter=on) for on in (True, False)}
        self.room = engine.context_length - max_tokens
        self.failed: list[str] = []  # why answers are missing: a prompt too long, an engine error

    def __call__(self, conversations: list[list[dict[str, str]]], adapter: bool) -> list[str | None]:
        """One answer per conversation; None where the prompt does not fit or the engine failed on it."""
        from appliance.engines.scheduler import generate

        def one(messages: list[dict[str, str]]) -> str | None:
            prompt = self.engine.tokenize(self.engine.render_chat(messages))
            if len(prompt) >= self.room:
                self.failed.append(f"a prompt of {len(prompt)} tokens leaves no room for {self.params[adapter].max_tokens} new ones")
                return None
            done = generate(self.engine, prompt, self.params[adapter], GENERATION_TIMEOUT)
            if done.reason not in ("stop", "length"):
                self.failed.append(f"{done.reason}: {done.error}")
                return None
            return done.text

        with ThreadPoolExecutor(self.engine.max_batch, thread_name_prefix="outcome") as pool:
            return list(pool.map(one, conversations))


def _open_engine(layout: Layout, settings: TrainerSettings, candidate: Adapter) -> Any:
    from appliance.engines import load_engine
    from appliance.errors import EngineError

    cfg = model_config(layout)
    cfg = replace(cfg, replicas=1, threads=settings.cpu_threads, context_length=min(cfg.context_length, settings.max_length + settings.eval_max_tokens))
    engine = load_engine(cfg, layout, max_batch=settings.eval_batch, max_queue=4 * settings.eval_batch, adapter=candidate)
    if engine.adapter_error or engine.adapter_id != candidate.id:
        engine.close()
        raise EngineError(f"The serving engine could not load the candidate adapter: {engine.adapter_error}.")
    engine.start()
    return engine


def _anchor(reference: list[str], answers: list[str | None]) -> tuple[Anchor, list[dict[str, Any]]]:
    got = [a or "" for a in answers]
    reps = [repetition_rate(a) for a in got]
    worst = max(range(len(got)), key=lambda i: reps[i]) if got else 0
    anchor = Anchor(agreement=round(mean([token_f1(a, r) for a, r in zip(got, reference, strict=True)]), 6),
                    repetition=round(mean(reps), 6), base_repetition=round(mean([repetition_rate(r) for r in reference]), 6),
                    worst=" ".join(got[worst].split())[:EXCERPT] if got and reps[worst] > 0 else "")
    shown = [{"prompt": p, "base": r[:200], "candidate": a[:200]} for p, r, a in zip(PROMPTS, reference, got, strict=True)]
    return anchor, shown


def _scores(items: list[Example], answers: list[str | None]) -> list[float]:
    return [0.0 if a is None else score_answer(a, x.messages[-1][1], x.answer_keys) for x, a in zip(items, answers, strict=True)]


def evaluate(layout: Layout, state_dir: Path, settings: TrainerSettings, items: list[Example], candidate: Adapter,
             active: Adapter | None, base_sha: str, log: Callable[[str], None] = print) -> tuple[Outcome, dict[str, Any]]:
    """Answer every item with the reference (the active adapter, else the base) and the candidate, and the
    anchor prompts with the candidate; (the outcome the gate decides on, details for the report)."""
    engine = _open_engine(layout, settings, candidate)
    try:
        ask = _Answerer(engine, settings.eval_max_tokens)
        conversations = [list(x.as_dicts()[:-1]) for x in items]
        cand = ask(conversations, True)
        anchors = [[{"role": "user", "content": p}] for p in PROMPTS]

        def of_base(convs: list[list[dict[str, str]]]) -> list[str | None]:
            return base_answers(state_dir / "base-answers", base_sha, engine.backend_name, settings.eval_max_tokens, convs, ask)

        anchor_ref = [a or "" for a in of_base(anchors)]
        anchor_cand = ask(anchors, True)
        ref_name, ref = "base model", None
        if active is not None:
            engine.swap_adapter(active, wait=GENERATION_TIMEOUT)
            if engine.adapter_id == active.id:
                ref_name, ref = "active adapter", ask(conversations, True)
            else:
                log(f"the active adapter {active.id} does not load in the engine ({engine.adapter_error}); comparing with the base model")
        if ref is None:
            ref = of_base(conversations)
    finally:
        engine.close()
    ref_scores, cand_scores = _scores(items, ref), _scores(items, cand)
    anchor, anchor_shown = _anchor(anchor_ref, anchor_cand)
    outcome = Outcome(ref_name, tuple(Item(excerpt(x), r, c) for x, r, c in zip(items, ref_scores, cand_scores, strict=True)), anchor)
    details = {"answers": [{"prompt": excerpt(x), "reference": mask_text((r or "")[:200]), "candidate": mask_text((c or "")[:200]),
                            "scores": [round(rs, 4), round(cs, 4)]}
                           for x, r, c, rs, cs in zip(items, ref, cand, ref_scores, cand_scores, strict=True)][:50],
               "anchor_answers": anchor_shown, "failed_answers": len(ask.failed), "failures": sorted(set(ask.failed))[:5]}
    return outcome, details


def eval_set(inbox: Path, parts: Split, settings: TrainerSettings) -> tuple[Split, EvalSet, int]:
    """(what is left to train and validate on, the gate's items, examples dropped because the frozen set asks them).

    A site's frozen set wins; without one, a slice of the training side is held back (split.hold_back).
    """
    frozen, files, rejected = load_frozen(inbox)
    if frozen:
        rest, _, dropped = hold_back(parts, 0.0, frozenset(x.prompt_key for x in frozen))
        return rest, EvalSet(cap(frozen, settings.eval_max_items), f"inbox/{EVAL_DIR}", files, rejected), dropped
    rest, held, _ = hold_back(parts, settings.eval_fraction, max_prompts=settings.eval_max_items)
    return rest, EvalSet(cap(held, settings.eval_max_items), "held back", files, rejected), 0


def gate_rules(settings: TrainerSettings) -> GateRules:
    return GateRules(margin=settings.gate_margin, max_p=settings.gate_max_p, max_broken=settings.gate_max_broken,
                     right_at=settings.gate_right_at, min_agreement=settings.anchor_min_agreement,
                     max_repetition=settings.anchor_max_repetition, anchor_tolerance=settings.anchor_tolerance)
