"""[trainer] of appliance.toml as a typed object: a help string per field, validators that say how to fix a value."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from appliance.config import ModelConfig, use_devices, validate_section
from appliance.errors import ApplianceError
from appliance.paths import Layout
from appliance.pii import parse_networks


class TrainerConfigError(ApplianceError):
    """A [trainer] setting in appliance.toml that is wrong."""


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class TrainerSettings:
    schedule: str = _f("*-*-* 03:00:00", "systemd OnCalendar expression of the nightly run")
    min_new_examples: int = _f(50, "new examples a scheduled run needs before it trains (`--now` ignores it)", min=0)
    learning_rate: float = _f(2e-3, "AdamW learning rate of the LoRA weights", min=1e-7, max=1.0)
    epochs: int = _f(2, "most passes over the training split", min=1, max=100)
    patience: int = _f(3, "evaluations without a better validation loss before training stops early", min=1)
    gate_margin: float = _f(0.02, "outcome score (0 to 1: key recall or token F1 of greedy answers to held-out items) the candidate "
                            "must gain over the active adapter, or the base model, to be promoted (0.02 = 2 points)", min=0.0, max=1.0)
    gate_max_p: float = _f(0.05, "the paired sign test over the held-out items must give a p-value below this to promote", min=0.0, max=1.0)
    gate_max_broken: int = _f(2, "held-out items the reference answered right that the candidate may answer wrong", min=0)
    gate_right_at: float = _f(0.5, "score at which a held-out item counts as answered right (for items fixed and broken)",
                              min=0.0, max=1.0)
    eval_fraction: float = _f(0.2, "most share of the training side's questions held back for the outcome gate when inbox/eval/ "
                              "holds no frozen set (and never more than eval_max_items questions)", min=0.0, max=0.5)
    eval_max_items: int = _f(64, "most held-out items the gate answers each run (the same ones every run, by hash)", min=1)
    eval_max_tokens: int = _f(48, "most new tokens of each greedy answer the gate generates", min=4, max=1024)
    eval_batch: int = _f(4, "answers the gate's engine decodes together", min=1, max=64)
    anchor_min_agreement: float = _f(0.15, "least mean token F1 between the candidate's and the base model's greedy answers to the "
                                     "generic anchor prompts", min=0.0, max=1.0)
    anchor_max_repetition: float = _f(0.2, "most share of repeated word 3-grams in the candidate's answers to the anchor prompts "
                                      "(or the base model's own share, where that is higher)", min=0.0, max=1.0)
    keep_adapters: int = _f(5, "registered adapters kept on disk (the active one and its predecessor always are)", min=1)
    lora_rank: int = _f(8, "LoRA rank r", min=1, max=256)
    lora_alpha: float = _f(16, "LoRA alpha (the update is scaled by alpha / rank)", min=0.0)
    lora_targets: list[str] = _f(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "module names that get LoRA weights")
    batch_size: int = _f(8, "examples per optimizer step (halved with gradient accumulation on out-of-memory)", min=1)
    max_length: int = _f(512, "tokens per example; longer examples are cut", min=16)
    validation_fraction: float = _f(0.1, "share of examples held out for validation (by hash, never trained on)", min=0.01, max=0.5)
    near_duplicate_threshold: float = _f(0.8, "estimated Jaccard similarity above which two examples are duplicates", min=0.1, max=1.0)
    max_per_answer: int = _f(8, "examples one answer (or near copies of it) may have in a run; a flood of prompts with one answer is cut to this", min=1)
    max_per_source: int = _f(50, "examples one API key's feedback may have in a run (inbox files are the site's own and are not capped); "
                             "a flood from one key is cut to this", min=1)
    replay_fraction: float = _f(0.5, "share of the training split drawn from earlier runs' training data (0.5: as many earlier "
                                "examples as new ones), so earlier facts are not forgotten; 0 turns replay off", min=0.0, max=0.9)
    replay_max: int = _f(200, "most earlier examples mixed into one run (each costs training time as a new one does)", min=0)
    keep_networks: tuple[str, ...] = _f((), "IP networks PII masking keeps, e.g. [\"10.20.0.0/16\"] for the site's server subnet "
                                        "(loopback and 0.0.0.0 always stay; other private addresses can point at a person's machine)")
    anchor_tolerance: float = _f(0.05, "how much worse the candidate may be on earlier runs' validation data", min=0.0, max=1.0)
    threads: int = _f(0, "CPU threads for training (0: half the cores, leaving the rest to the server)", min=0)
    min_batch_size: int = _f(1, "smallest micro-batch before an out-of-memory run gives up", min=1)
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass: far less memory for about a third more time "
                                      "(bundles/README.md sizes the 7B GPU tiers with it)")
    gpu_memory_mib: int = _f(0, "free memory each planned GPU must have before training starts (0: the bf16 weights + 25% + 1 GiB)", min=0)
    deadline: str = _f("06:30", 'local time of day (HH:MM) by which a scheduled run has finished: training stops in time to '
                       'evaluate, gate and export before it ("": no deadline; `appliance train --now` is not bound by it)')
    deadline_reserve_minutes: float = _f(15.0, "minutes kept before the deadline for the gate and the export, on top of the "
                                         "evaluation passes as measured in the run", min=0.0)
    checkpoint_minutes: float = _f(10.0, "minutes between checkpoints; a killed run resumes from the last one (0: after every step)",
                                   min=0.0)
    dp_epsilon: float = _f(0.0, "differential privacy: the ε to reach over the run with DP-SGD on the LoRA weights; the noise is "
                           "chosen for it (0: off unless dp_noise_multiplier is set)", min=0.0)
    dp_noise_multiplier: float = _f(0.0, "differential privacy: fixed noise (standard deviation / dp_max_grad_norm) instead of a "
                                    "target ε; the run reports the ε it spent (0: off unless dp_epsilon is set)", min=0.0)
    dp_max_grad_norm: float = _f(1.0, "differential privacy: each example's gradient is clipped to this norm", min=1e-6)
    dp_delta: float = _f(0.0, "differential privacy: δ of the (ε, δ) guarantee (0: 1 / the number of training examples)",
                         min=0.0, max=0.1)
    seed: int = _f(0, "random seed of LoRA initialisation and shuffling")

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata["help"] for f in fields(cls)}

    @property
    def cpu_threads(self) -> int:
        """The threads a run trains and evaluates on: `threads`, or half the cores (the server keeps the
        rest; on a busy machine fewer threads train faster than threads that wait on each other)."""
        return self.threads or max(1, (os.cpu_count() or 2) // 2)


def parse_trainer_settings(table: dict[str, Any], source: str = "[trainer]") -> TrainerSettings:
    """Validate a [trainer] table; a key it does not know (a typo) is an error that names it."""
    settings: TrainerSettings = validate_section(TrainerSettings, "trainer", table, source, TrainerConfigError)
    try:
        parse_networks(settings.keep_networks)
    except ValueError as e:
        raise TrainerConfigError(f"{source} keep_networks: {e}.") from None
    return settings


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise TrainerConfigError(f"The configuration file {path} does not exist.",
                                 "Install the appliance first, or pass --root to the tree it was installed into.") from None
    except tomllib.TOMLDecodeError as e:
        raise TrainerConfigError(f"The configuration file {path} is not valid TOML: {e}.", "Fix the line it names.") from None


def load_trainer_settings(layout: Layout, path: Path | None = None) -> TrainerSettings:
    """[trainer] from appliance.toml under the layout's root (defaults for a missing section)."""
    path = path or layout.config_file
    table = read_toml(path).get("trainer", {})
    if not isinstance(table, dict):
        raise TrainerConfigError(f"[trainer] in {path} is not a table.")
    return parse_trainer_settings(table, f"[trainer] in {path}:")


@dataclass(frozen=True)
class BaseModelRef:
    """What the trainer needs from [model]: the weights it adapts and how the server runs them."""

    id: str
    backend: str
    path: Path
    gpus: tuple[int, ...] = ()  # [model] gpus: NVML indices of the GPUs the tier runs on (none: the CPU)


def load_base_model_ref(layout: Layout, path: Path | None = None) -> BaseModelRef:
    """[model] path/backend/id, with the path resolved under --root; CUDA is pointed at the GPUs the
    installer planned ([model] cuda_visible_devices), as the server is.

    [model] is checked in full, by the validator the server uses.
    """
    path = path or layout.config_file
    table = read_toml(path).get("model")
    if not isinstance(table, dict) or not isinstance(table.get("path"), str):
        raise TrainerConfigError(f"{path} has no [model] path, so there is no base model to train.",
                                 "Install a bundle first; the installer writes [model].")
    model: ModelConfig = validate_section(ModelConfig, "model", table, f"[model] in {path}:", TrainerConfigError)
    use_devices(model)  # the planned GPUs, before CUDA starts
    return BaseModelRef(model.id, model.backend, model.resolve_path(layout), model.gpus)
