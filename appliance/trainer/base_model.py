"""The base weights the trainer adapts, as a safetensors directory transformers can load.

For transformers tiers [model].path already is one. For llama.cpp tiers it is a GGUF file: the
trainer dequantizes it once through transformers' GGUF loader and keeps the result in a cache keyed
by the file's SHA-256, so later runs start in seconds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from appliance.atomic import fsync_dir
from appliance.errors import ApplianceError

DONE = ".complete"


class BaseModelError(ApplianceError):
    default_hint = "Check [model].path in appliance.toml; reinstall the bundle if the model files are damaged."


def content_hash(path: Path) -> str:
    """SHA-256 of a model file, or of a directory's files in name order (names included)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def dequantize_gguf(gguf_file: Path, out: Path) -> None:
    """Load a GGUF through transformers (which dequantizes it) and save it as safetensors in `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        tok = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    except Exception as e:  # transformers raises many types for an unreadable or unsupported file
        raise BaseModelError(f"The base model {gguf_file} cannot be loaded for training: {e}.") from None
    # The loaded weights are plain float tensors; only the quantizer marker stops save_pretrained.
    setattr(model, "hf_quantizer", None)  # noqa: B010  (typed as a module attribute; clearing it is the point)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


def materialize(model_path: Path, cache_root: Path) -> tuple[Path, str]:
    """(safetensors directory, content hash of the base model as installed)."""
    if not model_path.exists():
        raise BaseModelError(f"The base model {model_path} does not exist.")
    digest = content_hash(model_path)
    if model_path.is_dir():
        return model_path, digest
    cached = cache_root / digest
    if (cached / DONE).is_file():
        return cached, digest
    staging = cache_root / f".{digest}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    dequantize_gguf(model_path, staging)
    (staging / DONE).write_text(f"{model_path.name}\n")
    shutil.rmtree(cached, ignore_errors=True)
    os.rename(staging, cached)
    fsync_dir(cache_root)
    # Only the current base model's cache is worth its disk space.
    for p in cache_root.iterdir():
        if p.name != digest:
            shutil.rmtree(p, ignore_errors=True)
    return cached, digest
