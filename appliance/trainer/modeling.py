"""Loading the base model and the LoRA around it, and the evaluation stage (base, active, candidate)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.adapters import Adapter
from appliance.trainer.base_model import materialize
from appliance.trainer.distributed import FP32, Precision, World
from appliance.trainer.promotion import Losses
from appliance.trainer.settings import BaseModelRef, TrainerSettings
from appliance.trainer.train import Encoded, evaluate_loss


@dataclass
class Base:
    model: Any
    tokenizer: Any
    pad_id: int
    sha256: str
    config: dict[str, Any]
    dir: Path


def load_base(ref: BaseModelRef, cache_root: Path, world: World | None = None, precision: Precision = FP32) -> Base:
    """The base weights on this rank's device in `precision`'s dtype (float32 on the CPU, bf16 or fp16 on a GPU).
    Under torchrun rank 0 makes the dequantized cache first; the others then read it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    world = world or World()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if not world.main:
        world.barrier()
    directory, digest = materialize(ref.path, cache_root)
    if world.main:
        world.barrier()
    tok = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, precision.weights))
    model = model.to(world.device)  # type: ignore[arg-type]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    config = json.loads((directory / "config.json").read_text())
    return Base(model, tok, int(pad), digest, config, directory)


def new_lora(model: Any, settings: TrainerSettings, parent: Adapter | None = None) -> Any:
    """Wrap the base in a LoRA (base weights frozen), starting from the parent adapter when its shape matches.

    Continuing from the active adapter keeps what earlier nights taught; the gate's anchor check
    then catches a run that unlearns it.
    """
    import torch
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    torch.manual_seed(settings.seed)  # every rank of a torchrun run starts from the same LoRA
    if settings.gradient_checkpointing:
        # Non-reentrant: the frozen base's inputs need no grad for the LoRA's gradients to flow.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # peft annotates lora_alpha as int but scales by alpha / r in floating point; a float is fine.
    cfg = LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha, target_modules=list(settings.lora_targets),  # type: ignore[arg-type]
                     lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    try:
        peft_model = get_peft_model(model, cfg, adapter_name="default")
    except ValueError as e:
        from appliance.trainer.settings import TrainerConfigError

        raise TrainerConfigError(f"lora_targets {settings.lora_targets} do not fit this model: {e}.",
                                 'Use projection names of the model, e.g. ["q_proj", "v_proj"].') from None
    if parent is not None and _same_shape(parent, settings):
        from safetensors.torch import load_file

        set_peft_model_state_dict(peft_model, load_file(parent.peft_dir / "adapter_model.safetensors"), adapter_name="default")
    return peft_model


def _same_shape(parent: Adapter, settings: TrainerSettings) -> bool:
    try:
        cfg = json.loads((parent.peft_dir / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return False
    return (cfg.get("r") == settings.lora_rank and float(cfg.get("lora_alpha", -1)) == float(settings.lora_alpha)
            and sorted(cfg.get("target_modules") or []) == sorted(settings.lora_targets))


def evaluate_all(model: Any, active: Adapter | None, val: list[Encoded], anchor: list[Encoded], pad_id: int,
                 precision: Precision = FP32, candidate_val: float | None = None) -> Losses:
    """Validation loss of the base (adapter disabled), the active adapter (loaded beside) and the candidate.

    The anchor (earlier runs' validation data) is scored for the candidate and for the reference
    the gate compares against: the active adapter, or the base when none is active. `candidate_val`:
    the candidate's validation loss when training already measured it on these weights (train_lora's
    best_val_loss: it returns holding the best weights seen), so that pass is not made again.
    """
    with model.disable_adapter():
        base_loss = evaluate_loss(model, val, pad_id, precision=precision)
        # The base is the anchor's reference only when no adapter is active.
        ref_anchor = evaluate_loss(model, anchor, pad_id, precision=precision) if anchor and active is None else None
    cand = candidate_val if candidate_val is not None and math.isfinite(candidate_val) else evaluate_loss(model, val, pad_id, precision=precision)
    cand_anchor = evaluate_loss(model, anchor, pad_id, precision=precision) if anchor else None
    active_loss = None
    if active is not None:
        model.load_adapter(str(active.peft_dir), adapter_name="active", is_trainable=False)
        model.set_adapter("active")
        try:
            active_loss = evaluate_loss(model, val, pad_id, precision=precision)
            ref_anchor = evaluate_loss(model, anchor, pad_id, precision=precision) if anchor else None
        finally:
            model.set_adapter("default")
            model.delete_adapter("active")
    return Losses(base_loss, active_loss, cand, ref_anchor, cand_anchor if anchor else None)


def is_finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)
