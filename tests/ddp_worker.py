"""One rank of the data-parallel training test (tests/test_trainer_ddp.py): run alone, or under torchrun.

    python tests/ddp_worker.py BASE_DIR OUT.json            # one process
    torchrun --nproc-per-node 2 tests/ddp_worker.py ...     # two, on gloo (CPU)

A few steps of the real training loop on SmolLM2-135M and the demo data; rank 0 writes the history,
each LoRA tensor's shape and a checksum of its values.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(base_dir: str, out: str) -> None:
    import torch

    from appliance.trainer.data import check_record
    from appliance.trainer.distributed import from_env, precision_for
    from appliance.trainer.modeling import load_base, new_lora
    from appliance.trainer.settings import BaseModelRef, TrainerSettings
    from appliance.trainer.train import encode, train_lora

    torch.set_num_threads(1)
    world = from_env()
    settings = TrainerSettings(learning_rate=5e-3, epochs=1, batch_size=4, max_length=64, lora_rank=4, lora_alpha=8,
                               lora_targets=["q_proj", "v_proj"], patience=10)
    base = load_base(BaseModelRef("smollm2", "transformers", Path(base_dir)), Path(out).parent / "cache", world, precision_for(world.device))
    lines = [json.loads(x) for x in (REPO / "bundles/demo-data/train.jsonl").read_text().splitlines() if x.strip()]
    data = [e for e in (encode(base.tokenizer, check_record(x), settings.max_length) for x in lines[:16]) if e is not None]
    model = new_lora(base.model, settings)
    result = train_lora(model, data[:12], data[12:], settings, base.pad_id, log=lambda _m: None, max_steps=3, world=world)
    if world.main:
        lora = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}
        Path(out).write_text(json.dumps({
            "world": world.size, "steps": result.steps, "history": result.history, "tokens": result.trained_tokens,
            "shapes": {n: list(t.shape) for n, t in lora.items()},
            "sums": {n: float(t.abs().sum()) for n, t in lora.items()}}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
