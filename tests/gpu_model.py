"""The SmolLM2-135M the GPU tests and bench/gpu.py run: the real weights where this checkout has them
(build/test-models, made from the demo model package), else SmolLM2's own config and tokenizer with
seeded random weights (a device machine that cannot fetch the 98 MB model: bench/gpu_session.sh
carries the config and tokenizer in .gpu/). Random weights decode the same shapes at the same speed;
they only answer nonsense.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REAL = REPO / "build" / "test-models" / "smollm2-135m-safetensors"
CARRIED = REPO / ".gpu" / "smollm2-config"  # config.json, tokenizer files: what travels to the device
FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def model_dir() -> tuple[Path, bool]:
    """(safetensors directory, True for the real weights)."""
    given = os.environ.get("APPLIANCE_GPU_MODEL")
    if given:
        return Path(given), True
    if (REAL / "config.json").is_file() and any(REAL.glob("*.safetensors")):
        return REAL, True
    out = REPO / ".gpu" / "smollm2-random"
    if not (out / "model.safetensors").is_file():
        import shutil

        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        if not (CARRIED / "config.json").is_file():
            raise FileNotFoundError(f"Neither {REAL} nor {CARRIED} exists: run `bench/gpu_session.sh prepare` in a checkout with the model.")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(CARRIED)).to(torch.bfloat16)
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        for name in FILES:
            if (CARRIED / name).is_file():
                shutil.copy(CARRIED / name, tmp / name)
        tmp.rename(out)
    return out, False


def random_lora(base: Path, out: Path, rank: int = 8) -> Path:
    """A PEFT LoRA with random B matrices (so it changes answers) for the model in `base`; returns its peft/ folder."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.save_pretrained(out / "peft")
    return out / "peft"
