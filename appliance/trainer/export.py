"""Export a trained LoRA: PEFT format (safetensors) always, and a GGUF LoRA for llama.cpp tiers.

The GGUF file follows llama.cpp's own adapter layout (as its convert_lora_to_gguf.py writes it):
`general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha` as float32, and for each
adapted base tensor `<gguf name>.weight.lora_a` (rank x in) and `.lora_b` (out x rank) under the
base model's GGUF tensor names.

Q/K row order: for some architectures llama.cpp's converter (convert_hf_to_gguf.py) permutes the rows
of q_proj and k_proj into its interleaved rotary layout, and transformers' GGUF loader (which makes the
trainer's base weights) permutes them back; the B matrices of q_proj/k_proj then need the converter's
permutation too. Of the architectures transformers can load from GGUF that is only `llama` (LlamaModel,
`undo_permute = True`; Mistral GGUFs are `llama` too). Qwen2, Qwen3, Phi-3, Gemma and the rest keep
Hugging Face's row order (their rotary embedding is NeoX-style in both), so their B matrices are
written as trained.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from appliance.errors import ApplianceError


class ExportError(ApplianceError):
    """An adapter that cannot be turned into a GGUF LoRA for llama.cpp."""


_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")


def save_peft(model: Any, out: Path, base_model_id: str) -> Path:
    """adapter_config.json + adapter_model.safetensors in `out`."""
    model.save_pretrained(out, safe_serialization=True)
    cfg_path = out / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    # A local cache path means nothing on another machine; name the model instead.
    cfg["base_model_name_or_path"] = base_model_id
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


# GGUF architectures whose Q/K rows llama.cpp's converter permutes and transformers' loader un-permutes.
QK_PERMUTED = frozenset({"llama"})


def rope_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for Q/K: within each head, interleaved halves instead of split halves."""
    dim = rows.shape[0] // n_head // 2
    return rows.reshape(n_head, 2, dim, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def write_gguf_lora(peft_dir: Path, out: Path, model_config: dict[str, Any], arch: str = "llama") -> Path:
    """Convert a PEFT LoRA (safetensors) into llama.cpp's GGUF adapter for a base of GGUF architecture `arch`."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    if cfg.get("use_dora") or cfg.get("use_rslora"):
        raise ExportError("Only plain LoRA adapters can be exported to GGUF (not DoRA or rsLoRA).")
    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(arch)
    if arch_enum is None:
        raise ExportError(f"llama.cpp does not know the architecture {arch!r}.")
    n_layers = int(model_config["num_hidden_layers"])
    n_head = int(model_config["num_attention_heads"])
    n_kv = int(model_config.get("num_key_value_heads") or n_head)
    names = gguf.get_tensor_name_map(arch_enum, n_layers)

    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in load_file(peft_dir / "adapter_model.safetensors").items():
        m = _LORA_KEY.match(key)
        if not m:
            raise ExportError(f"The adapter holds {key!r}, which is not a LoRA A or B matrix.",
                              "Train adapters with lora_targets only; embeddings cannot be exported.")
        pairs.setdefault(m["module"], {})[m["ab"]] = value.astype(np.float32)

    writer = gguf.GGUFWriter(out, arch=arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(cfg["lora_alpha"]))
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ExportError(f"The adapter's {module} has only one of its two LoRA matrices.")
        gguf_name = names.get_name(module)
        if gguf_name is None:
            raise ExportError(f"llama.cpp has no tensor for {module}.", "Choose lora_targets among the attention and MLP projections.")
        a, b = ab["A"], ab["B"]
        if arch in QK_PERMUTED and module.endswith("self_attn.q_proj"):
            b = rope_permute(b, n_head)
        elif arch in QK_PERMUTED and module.endswith("self_attn.k_proj"):
            b = rope_permute(b, n_kv)
        writer.add_tensor(f"{gguf_name}.weight.lora_a", np.ascontiguousarray(a))
        writer.add_tensor(f"{gguf_name}.weight.lora_b", np.ascontiguousarray(b))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def gguf_architecture(path: Path) -> str:
    """general.architecture of a GGUF file (the adapter must name the same).

    Read from the metadata at the head of the file, without gguf.GGUFReader: that one maps every
    field, the tokenizer's tens of thousands of strings included (3-4 s a run on 2 cores)."""
    import struct

    import gguf

    # The value types as the gguf package defines them: a string is a u64 length and its bytes, an
    # array a u32 element type, a u64 count and the elements; the rest have a fixed size.
    fixed = {int(t): np.dtype(d).itemsize for t, d in gguf.GGUFReader.gguf_scalar_to_np.items()}
    string, array = int(gguf.GGUFValueType.STRING), int(gguf.GGUFValueType.ARRAY)

    def take(f: Any, fmt: str) -> Any:
        raw = f.read(struct.calcsize(fmt))
        if len(raw) != struct.calcsize(fmt):
            raise ExportError(f"{path.name} ends inside its metadata, before general.architecture.",
                              "Check the model file against the bundle's manifest; it is truncated.")
        return struct.unpack(fmt, raw)[0]

    def skip(f: Any, vtype: int) -> None:
        if vtype in fixed:
            f.seek(fixed[vtype], 1)
        elif vtype == string:
            f.seek(take(f, "<Q"), 1)
        elif vtype == array:
            etype, count = take(f, "<I"), take(f, "<Q")
            if etype in fixed:
                f.seek(fixed[etype] * count, 1)
            else:
                for _ in range(count):
                    skip(f, etype)
        else:
            raise ExportError(f"{path.name} has a metadata value of unknown type {vtype}.",
                              "Use a GGUF file written by llama.cpp's converter (GGUF version 2 or 3).")

    with path.open("rb") as f:
        if f.read(4) != b"GGUF" or take(f, "<I") not in (2, 3):
            raise ExportError(f"{path.name} is not a GGUF file of version 2 or 3.", "Use a GGUF model written by llama.cpp's converter.")
        take(f, "<Q")  # tensor count
        for _ in range(take(f, "<Q")):
            key = f.read(take(f, "<Q")).decode("utf-8", "replace")
            vtype = take(f, "<I")
            if key == "general.architecture" and vtype == string:
                return f.read(take(f, "<Q")).decode()
            skip(f, vtype)
    raise ExportError(f"{path.name} names no general.architecture in its metadata.", "Use a GGUF model written by llama.cpp's converter.")
