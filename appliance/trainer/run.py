"""One training run, stage by stage: collect → validate → mask → dedupe → split → train → evaluate →
gate → export → register → promote → report. Every stage's counts go into runs/<id>.json.

Crash safety: the candidate is built in a `.partial` staging directory and appears by one rename;
the active link moves by one rename; trainer state is written after registration. A run killed at
any point leaves the active adapter as it was, and the next run starts from the previous state.
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import Any

from appliance import adapters as registry
from appliance import audit
from appliance.errors import ApplianceError
from appliance.feedback_store import FeedbackStore
from appliance.paths import Layout
from appliance.pii import parse_networks
from appliance.trainer import replay as rp
from appliance.trainer import state as st
from appliance.trainer.checkpoint import controls, finish
from appliance.trainer.data import Example, collect, mask_examples, validate
from appliance.trainer.dedupe import dedupe, without_corrected
from appliance.trainer.promotion import decide
from appliance.trainer.report import write_report
from appliance.trainer.settings import TrainerSettings, load_base_model_ref, load_trainer_settings
from appliance.trainer.split import split
from appliance.trainer.train import MicroHook


@dataclass
class RunOptions:
    now: bool = False  # ignore min_new_examples
    settings: TrainerSettings | None = None  # None: [trainer] of appliance.toml
    max_steps: int | None = None  # cap optimizer steps (tests, smoke runs)
    before_micro: MicroHook | None = None  # fault injection point (tests)
    log: Callable[[str], None] = print
    clock: Callable[[], datetime] | None = None  # local time the [trainer] deadline is measured by (tests)


def new_run_id() -> str:
    """UTC second, then its milliseconds, then 3 random bytes: ids (and report file names) sort by start time,
    also for two runs that start in the same second."""
    now = datetime.now(timezone.utc)
    return now.strftime("%Y%m%dT%H%M%SZ") + f"-{now.microsecond // 1000:03d}" + secrets.token_hex(3)


def _data_hash(examples: list[Example]) -> str:
    return hashlib.sha256("\n".join(sorted(e.key for e in examples)).encode()).hexdigest()


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(x, 6)


def run_training(layout: Layout, options: RunOptions | None = None) -> dict[str, Any]:
    """Run the pipeline once under the lock; return the run report (also written to runs/<id>.json).
    Under torchrun (the trainer unit of a multi-GPU tier) ranks other than 0 only train their share."""
    opts = options or RunOptions()
    paths = st.TrainerPaths(layout)
    if int(os.environ.get("RANK", "0")) != 0:
        return _helper_rank(layout, paths, opts)
    with st.run_lock(paths):
        registry.clean_partials(layout)
        st.clean_leftovers(paths)
        run_id = new_run_id()
        report: dict[str, Any] = {"id": run_id, "started_at": datetime.now(timezone.utc).isoformat(), "status": "running", "stages": {}}
        audit.append(layout, {"event": "training_started", "run": run_id, "now": opts.now})
        t0 = time.perf_counter()
        try:
            _pipeline(layout, paths, opts, run_id, report)
        except ApplianceError as e:
            report.update(status="failed", reason=e.message)
            raise
        except BaseException as e:  # an unexpected failure still leaves a report for the console
            report.update(status="failed", reason=f"{type(e).__name__}: {e}")
            raise
        finally:
            report["finished_at"] = datetime.now(timezone.utc).isoformat()
            report["seconds"] = round(time.perf_counter() - t0, 2)
            write_report(paths.runs, report)
            audit.append(layout, {"event": "training_finished", "run": run_id, "outcome": report["status"],
                                  "reason": report.get("reason"), "adapter": report.get("adapter"), "seconds": report["seconds"]})
        return report


@dataclass(frozen=True)
class _Data:
    """What the data stages made of the inbox and the feedback store."""

    prior: dict[str, Any]  # the trainer state before this run
    collected: Any
    deduped: Any
    parts: Any
    anchor: list[Example]  # earlier runs' validation examples, less those this run corrects
    replay: rp.Replay  # earlier runs' training examples this run mixes into its training split (only there)
    evaluation: Any = None  # the outcome gate's items (outcome.EvalSet)
    keep: tuple[Any, ...] = ()  # [trainer] keep_networks, parsed: masking leaves these addresses


@dataclass(frozen=True)
class _Candidate:
    model: Any
    base: Any
    active: Any
    result: Any
    decision: Any
    train: list[Example]
    validation: list[Example]
    losses: Any = None  # validation losses, reported beside the outcome gate


def _with_eval_set(paths: st.TrainerPaths, settings: TrainerSettings, data: _Data, stages: dict[str, Any]) -> _Data:
    """The outcome gate's items: inbox/eval/ or a held-back slice; neither is trained or validated on."""
    from appliance.trainer.outcome import eval_set

    parts, evaluation, dropped = eval_set(paths.inbox, data.parts, settings)
    stages["split"] = dict(stages.get("split", {}), train=len(parts.train), validation=len(parts.validation),
                           held_back=len(data.parts.train) - len(parts.train), in_eval_set=dropped, evaluation=evaluation.summary())
    return replace(data, parts=parts, evaluation=evaluation)


def _gate(layout: Layout, paths: st.TrainerPaths, settings: TrainerSettings, data: _Data, c: _Candidate, run_id: str,
          staged: Any, stages: dict[str, Any], log: Callable[[str], None]) -> _Candidate:
    """The exported candidate's answers through the serving engine, scored, decide promote-or-keep."""
    from appliance.trainer.outcome import evaluate, gate_rules
    from appliance.trainer.promotion import Outcome

    items = data.evaluation.items
    details: dict[str, Any] = {}
    log(f"gate: answering {len(items)} held-out items ({data.evaluation.source}) and the anchor prompts through the engine")
    try:
        outcome, details = evaluate(layout, paths.dir, settings, items, registry.Adapter(run_id, staged), c.active, c.base.sha256, log) \
            if items else (Outcome("active adapter" if c.active else "base model", (), None), {})
    except ApplianceError as e:
        outcome = Outcome("active adapter" if c.active else "base model", (), None, error=f"the candidate could not be evaluated: {e.message}")
    decision = decide(replace(outcome, source=data.evaluation.source), c.losses, gate_rules(settings))
    stages["gate"] = decision.to_json() | details
    log(f"gate: {'promote' if decision.promote else 'keep'}: {decision.reason}")
    return replace(c, decision=decision)


def _prepare(paths: st.TrainerPaths, settings: TrainerSettings, run_id: str, stages: dict[str, Any],
             log: Callable[[str], None]) -> _Data:
    """collect → validate → mask → dedupe → split."""
    prior = st.load_trainer_state(paths)
    store = FeedbackStore(paths.feedback_db) if paths.feedback_db.exists() else None
    try:
        collected = collect(paths.inbox, store, int(prior.get("last_feedback_row", 0)))
    finally:
        if store:
            store.close()
    stages["collect"] = dict(collected.counts, records=len(collected.records))
    validated = validate(collected)
    stages["validate"] = {"kept": len(validated.examples), "rejected": len(validated.rejected),
                          "rejected_lines": [asdict(r) for r in validated.rejected[:100]]}
    keep = parse_networks(settings.keep_networks)
    masked, pii_counts = mask_examples(validated.examples, keep)
    stages["pii"] = {"masked": dict(pii_counts)}
    deduped = dedupe(masked, st.load_seen(paths), settings.near_duplicate_threshold, settings.max_per_answer,
                     settings.max_per_source)
    earlier = st.load_anchor(paths)
    anchor = without_corrected(earlier, deduped.examples, settings.near_duplicate_threshold)
    stages["dedupe"] = {"kept": len(deduped.examples), "exact": deduped.exact_dupes, "near": deduped.near_dupes,
                        "seen_in_earlier_runs": deduped.seen_before, "superseded": deduped.superseded,
                        "corrections": deduped.corrections, "capped": deduped.capped, "capped_source": deduped.capped_source,
                        "anchor_corrected": len(earlier) - len(anchor)}
    parts = split(deduped.examples, settings.validation_fraction)
    stages["split"] = {"train": len(parts.train), "validation": len(parts.validation)}
    replay = rp.plan(st.load_replay(paths), deduped.examples, parts.train, settings)
    stages["replay"] = replay.counts()
    log(f"run {run_id}: {len(collected.records)} records, {len(validated.examples)} valid, "
        f"{len(deduped.examples)} after dedupe, {len(parts.train)} train / {len(parts.validation)} validation")
    return _Data(prior, collected, deduped, parts, anchor, replay, keep=keep)


def _pipeline(layout: Layout, paths: st.TrainerPaths, opts: RunOptions, run_id: str, report: dict[str, Any]) -> None:
    settings = opts.settings or load_trainer_settings(layout)
    model_ref = load_base_model_ref(layout)
    data = _with_eval_set(paths, settings, _prepare(paths, settings, run_id, report["stages"], opts.log), report["stages"])
    new = len(data.deduped.examples)
    if not opts.now and new < settings.min_new_examples:
        report.update(status="skipped", reason=f"{new} new examples, fewer than min_new_examples = {settings.min_new_examples}")
        return  # nothing consumed: the inbox and the feedback position stay for the next run
    if not data.parts.train or not data.parts.validation:
        report.update(status="skipped", reason=f"{new} usable examples after filtering, too few to train and validate on")
        _consume(paths, data, [], run_id)
        return
    candidate = _train(layout, paths, opts, settings, model_ref, data, report["stages"])
    if candidate is None:
        report.update(status="skipped", reason="no example fits max_length with its answer, nothing to train on")
        _consume(paths, data, [], run_id)
        return
    _register(layout, paths, settings, model_ref, data, candidate, run_id, report, opts.log)
    finish(paths.dir, report, candidate.result)  # the checkpoint has served; resumed / deadline / privacy in the reason


def _helper_rank(layout: Layout, paths: st.TrainerPaths, opts: RunOptions) -> dict[str, Any]:
    """A torchrun rank other than 0: the same data and steps as rank 0, its share of each; rank 0 does the rest."""
    settings = opts.settings or load_trainer_settings(layout)
    data = _with_eval_set(paths, settings, _prepare(paths, settings, "rank", {}, lambda _m: None), {})
    if data.parts.train and data.parts.validation and (opts.now or len(data.deduped.examples) >= settings.min_new_examples):
        _train(layout, paths, RunOptions(opts.now, settings, opts.max_steps, opts.before_micro, lambda _m: None),
               settings, load_base_model_ref(layout), data, {})
    return {"status": "rank", "rank": int(os.environ.get("RANK", "0"))}


def _deadline_for(settings: TrainerSettings, opts: RunOptions) -> TrainerSettings:
    """The morning deadline binds the scheduled run; `appliance train --now` is an administrator's
    explicit request, like its disregard of min_new_examples, and trains to the end."""
    return replace(settings, deadline="") if opts.now else settings


def _devices(settings: TrainerSettings, model_ref: Any) -> tuple[Any, Any]:
    """This process's World and Precision; a GPU with too little free memory stops the run before it loads anything."""
    from appliance.trainer import distributed

    if model_ref.gpus:
        need = settings.gpu_memory_mib
        if not need and model_ref.path.is_dir():
            need = distributed.needed_gpu_mib(model_ref.path, "bfloat16")
        elif not need:  # a GGUF: about 3.6 times its size in bf16 once dequantized
            need = int(model_ref.path.stat().st_size * 3.6 * 1.25) // 2**20 + 1024
        distributed.check_gpu_memory(model_ref.gpus, need)
    world = distributed.from_env(model_ref.gpus)
    return world, distributed.precision_for(world.device)


def _train(layout: Layout, paths: st.TrainerPaths, opts: RunOptions, settings: TrainerSettings, model_ref: Any,
           data: _Data, stages: dict[str, Any]) -> _Candidate | None:
    """train → evaluate → gate; None when no example fits max_length (on ranks other than 0: train only)."""
    import torch

    from appliance.trainer.modeling import evaluate_all, load_base, new_lora
    from appliance.trainer.train import encode, train_lora

    log, stage_t = opts.log, time.perf_counter()
    torch.set_num_threads(settings.cpu_threads)
    world, precision = _devices(settings, model_ref)
    base = load_base(model_ref, paths.base_cache, world, precision)

    def enc(xs: list[Example]) -> list[tuple[Example, Any]]:
        return [(x, e) for x, e in ((x, encode(base.tokenizer, x, settings.max_length)) for x in xs) if e is not None]

    # Garbage is handled in layers: unparseable lines fail validation, floods collapse in dedupe, and
    # what remains must beat the active adapter without losing ground on earlier validation data.
    train_pairs, val_pairs = enc(data.parts.train + data.replay.outside(data.evaluation)), enc(data.parts.validation)
    if not train_pairs or not val_pairs:
        return None
    train_enc, val_enc = [e for _, e in train_pairs], [e for _, e in val_pairs]
    anchor_enc = [e for _, e in enc(data.anchor)]
    active = registry.active_adapter(layout)
    model = new_lora(base.model, settings, parent=active)
    log(f"base model {model_ref.id} ready in {time.perf_counter() - stage_t:.1f}s; training on {len(train_enc)} examples")
    result = train_lora(model, train_enc, val_enc, settings, base.pad_id, log=log, before_micro=opts.before_micro,
                        max_steps=opts.max_steps, world=world, precision=precision,
                        **controls(paths.dir, _deadline_for(settings, opts), train_enc, val_enc, base.sha256,
                                   active.id if active else None, world.main, log, opts.clock))
    if not world.main:
        return None
    stages["train"] = {k: v for k, v in asdict(result).items() if k != "history"} | {"history": result.history}
    losses = evaluate_all(model, active, val_enc, anchor_enc, base.pad_id, precision, candidate_val=result.best_val_loss)
    stages["evaluate"] = {k: _finite(v) for k, v in asdict(losses).items()}
    return _Candidate(model, base, active, result, None, [x for x, _ in train_pairs], [x for x, _ in val_pairs], losses)


def _register(layout: Layout, paths: st.TrainerPaths, settings: TrainerSettings, model_ref: Any, data: _Data,
              c: _Candidate, run_id: str, report: dict[str, Any], log: Callable[[str], None]) -> None:
    """export → register → (promote) → prune."""
    from appliance.trainer.export import gguf_architecture, save_peft, write_gguf_lora
    from appliance.trainer.export_check import check_export

    stages = report["stages"]
    staged = registry.staging_dir(layout, run_id)
    save_peft(c.model, staged / "peft", model_ref.id)
    stages["export"] = {"peft": True, "gguf": model_ref.backend == "llama.cpp"}
    if model_ref.backend == "llama.cpp":
        write_gguf_lora(staged / "peft", staged / "adapter.gguf", c.base.config, gguf_architecture(model_ref.path))
        check = check_export(c.model, c.base.tokenizer, model_ref.path, staged / "adapter.gguf",
                             settings.cpu_threads)
        stages["export"]["check"] = check.to_json()
        log(f"export check: {check.reason}")
    export_ok = stages["export"].get("check", {"agree": True})["agree"]
    c = _gate(layout, paths, settings, data, c, run_id, staged, stages, log)
    metadata = {
        "created_at": report["started_at"], "run": run_id, "parent": c.active.id if c.active else None,
        "base_model": {"id": model_ref.id, "backend": model_ref.backend, "sha256": c.base.sha256},
        "data_sha256": _data_hash(c.train + c.validation),
        "counts": {"train": len(c.train), "validation": len(c.validation)},
        "metrics": stages["evaluate"], "gate": c.decision.to_json(),
        "lora": {"rank": settings.lora_rank, "alpha": settings.lora_alpha, "targets": list(settings.lora_targets)},
        "training": {"learning_rate": settings.learning_rate, "steps": c.result.steps, "stopped_early": c.result.stopped_early},
        "privacy": c.result.privacy,  # ε, δ of a differentially private run (None: not private)
    }
    adapter = registry.register(layout, run_id, staged, metadata)
    report["adapter"] = adapter.id
    # State before promotion: a crash between the two leaves a registered, unpromoted adapter and
    # consumed data, which is what a "keep" decision would have left too.
    _consume(paths, data, c.validation, run_id)
    if c.decision.promote and export_ok:
        registry.promote(layout, adapter.id)
        report.update(status="promoted", reason=c.decision.reason)
        log(f"promoted {adapter.id}; the server switches to it by itself within about a second")
    else:  # a candidate the gate would promote but whose GGUF disagrees with PEFT stays registered, unpromoted
        report.update(status="kept", reason=c.decision.reason if not c.decision.promote else stages["export"]["check"]["reason"])
    stages["prune"] = {"removed": registry.prune(layout, settings.keep_adapters)}


def _consume(paths: st.TrainerPaths, data: _Data, validation: list[Example], run_id: str) -> None:
    anchor = data.anchor + validation
    state = dict(data.prior, last_feedback_row=data.collected.feedback_last_row, last_run=run_id)
    st.commit_state(paths, state, data.deduped.new_index, anchor, data.replay.store)
    st.move_processed(paths, data.collected.inbox_files, run_id, data.keep)
    os.sync()
