"""Bundle build time only: make a safetensors variant of a model from its GGUF file.

transformers' GGUF loader dequantizes every tensor into a dense model, which is then saved as
safetensors with its config, generation config and tokenizer, ready for the transformers backend.
torch and transformers are imported inside the function: the installer itself never needs them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.config import DTYPES
from appliance.errors import SpecError

if TYPE_CHECKING:
    from installer.toolchain.spec import SpecModel, SpecModelFile

CONVERT_DIR = "convert"  # scratch under the build directory, removed before the bundle is hashed


def convert_gguf(gguf: Path, out: Path, dtype: str = "bfloat16", log: Callable[[str], None] = lambda _m: None) -> list[Path]:
    """Write `out/` (config.json, model.safetensors, tokenizer files, ...) from `gguf`; return the files, sorted."""
    if dtype not in DTYPES:
        raise SpecError(f"Cannot convert to dtype {dtype!r}; use one of {', '.join(DTYPES)}.")
    gguf = Path(gguf)
    if not gguf.is_file():
        raise SpecError(f"The GGUF file {gguf} to convert does not exist.")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched from a hub, ever
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    except ImportError as e:
        raise SpecError(f"Converting {gguf.name} to safetensors needs torch and transformers ({e.name} is missing).",
                        "Build bundles in the environment `make setup` creates (the `train` extra).") from None
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the build prints its own steps
    hf_logging.set_verbosity_error()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    log(f"converting {gguf.name} to safetensors ({dtype})")
    try:
        # dequantize=True gives a plain dense model; a GGUF-quantized one cannot be saved.
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=getattr(torch, dtype),
            quantization_config=GgufConfig(dequantize=True), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise SpecError(f"transformers could not convert {gguf.name} to safetensors: {e}.",
                        "Check that the GGUF's architecture is one transformers can load.") from None
    files = sorted(p for p in out.rglob("*") if p.is_file())
    if not any(p.suffix == ".safetensors" for p in files):
        raise SpecError(f"Converting {gguf.name} produced no .safetensors file.")
    return files


def model_sources(model: SpecModel, scratch: Path, log: Callable[[str], None] = lambda _m: None) -> tuple[SpecModelFile, ...]:
    """The plaintext files of a spec model: its listed files, or those of its conversion (made now, in `scratch`)."""
    from installer.toolchain.spec import SpecModelFile

    if model.convert_from is None:
        return model.files
    out = scratch / model.id
    files = convert_gguf(model.convert_from, out, model.convert_dtype, log)
    return tuple(SpecModelFile(p.relative_to(out).as_posix(), p) for p in files)
