"""The [server], [model] and [embeddings] sections of /etc/appliance/appliance.toml as typed, validated values.

The dataclasses below are the one definition of each key and its default: the installer writes
from them (installer/system/config_file.py) and the server reads with them. A key no section knows (a
typo) and a section the appliance does not read are errors that name them; so is a wrong type or
an out-of-range value. [trainer] is declared in appliance/trainer/settings.py and checked by the
same validator, validate_section.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError
from appliance.paths import Layout

BACKEND_FORMATS = {"llama.cpp": "gguf", "transformers": "safetensors"}  # and the model format each reads
BACKENDS = tuple(BACKEND_FORMATS)
DTYPES = ("float32", "bfloat16", "float16")
FLASH_ATTN = ("auto", "on", "off")


class ConfigError(ApplianceError):
    default_hint = "Fix /etc/appliance/appliance.toml (the installer wrote the original) and start again."


@dataclass(frozen=True)
class ServerConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind; 127.0.0.1 keeps the API on this host"})
    port: int = field(default=8088, metadata={"help": "TCP port", "min": 1, "max": 65535})
    max_queue: int = field(default=64, metadata={"help": "requests waiting beyond the live batch; more get 429", "min": 0})
    max_batch: int = field(default=8, metadata={"help": "sequences decoded together", "min": 1, "max": 256})
    prefill_chunk: int = field(default=256, metadata={
        "help": "prompt tokens prefilled per decode step (new requests together); a longer prompt is prefilled over "
                "several steps between the live answers' tokens, so it does not stall them; 0: whole prompts at once", "min": 0})
    prefill_share: float = field(default=0.3, metadata={
        "help": "while answers stream, the most share of each decode step's time (as measured) that new prompts' prefill takes: "
                "the streams' next token comes at most 1 / (1 - share) times later (0.3: 1.4x) and a long new prompt's first "
                "token later; 1: prefill_chunk tokens a step whatever they cost (greedy answers then never depend on the load)",
        "min": 0.05, "max": 1.0})
    prefix_cache_mib: int = field(default=1024, metadata={
        "help": "memory for the KV cells of prompts that left the batch slots (a long system prompt, a chat's earlier turns): "
                "a prompt that starts the same way gets them back instead of prefilling them again, the least recently "
                "used going first (llama.cpp: host memory; transformers: the model's device); 0: none", "min": 0})
    max_queue_wait_s: float = field(default=10.0, metadata={
        "help": "a request expected to wait longer than this for a batch slot (from the measured drain rate) gets 429; 0: no bound",
        "min": 0})
    request_body_limit: int = field(default=1_048_576, metadata={"help": "largest request body in bytes; more get 413", "min": 1024})
    audit_prompts: bool = field(default=False, metadata={"help": "also write prompt text into the audit log"})
    audit_rotate_bytes: int = field(default=64 * 1024 * 1024, metadata={
        "help": "the audit log moves to audit-<time>.jsonl when it passes this size (the chain carries on)", "min": 1_048_576})
    audit_retention_days: int = field(default=183, metadata={
        "help": "rotated audit files are deleted only when closed longer ago than this (six months at least)", "min": 183})
    key_rpm: int = field(default=0, metadata={
        "help": "generation requests per minute a key may make unless it sets its own (`keys create --rpm`); 0: no limit", "min": 0})
    key_tpm: int = field(default=0, metadata={
        "help": "prompt + answer tokens per minute a key may use unless it sets its own (`--tpm`); 0: no limit", "min": 0})
    key_max_live: int = field(default=0, metadata={
        "help": "sequences one key may have queued or decoding at once unless it sets its own (`--max-live`); 0: no limit", "min": 0})
    corrections_per_day: int = field(default=50, metadata={
        "help": "corrections one key may send in 24 hours (one nightly run's worth); more get 429", "min": 0})
    accept_corrections: bool = field(default=False, metadata={
        "help": "use corrections from user keys without an admin's acceptance (`appliance feedback accept`)"})
    tls_cert: str = field(default="", metadata={
        "help": "PEM certificate (chain) to serve HTTPS with, absolute as seen on the target; empty: plain HTTP"})
    tls_key: str = field(default="", metadata={
        "help": "PEM private key of tls_cert: owned by root, mode 0600 (the server unit passes it as a credential)"})


@dataclass(frozen=True)
class ModelConfig:
    path: str = field(metadata={"help": "model file (gguf) or directory (safetensors), absolute as seen on the target"})
    id: str = field(default="model", metadata={"help": "model name the API reports"})
    tier: str = field(default="cpu", metadata={"help": "the tier the installer chose"})
    backend: str = field(default="llama.cpp", metadata={"help": "llama.cpp or transformers", "choices": BACKENDS})
    context_length: int = field(default=2048, metadata={"help": "tokens per sequence, prompt and answer", "min": 16})
    threads: int = field(default=2, metadata={"help": "CPU threads for llama.cpp", "min": 1})
    gpu_layers: int = field(default=0, metadata={"help": "layers llama.cpp offloads to the GPU (-1: all)", "min": -1})
    flash_attn: str = field(default="auto", metadata={
        "help": "llama.cpp's flash attention (auto: llama.cpp's choice, on); off decodes long contexts faster "
                "on the CPU, short ones and prompts slower (docs/operations.md)", "choices": FLASH_ATTN})
    dtype: str = field(default="float32", metadata={"help": "transformers weights dtype", "choices": DTYPES})
    replicas: int = field(default=1, metadata={"help": "model replicas (one per GPU on multi-gpu)", "min": 1})
    tensor_parallel: int = field(default=1, metadata={"help": "GPUs one replica spans (this server runs 1)", "min": 1, "max": 1})
    quantization: str = field(default="", metadata={"help": "the GGUF's quantization, as the tier names it (informative)"})
    gpus: tuple[int, ...] = field(default=(), metadata={"help": "NVML indices of the GPUs the installer planned for"})
    cuda_visible_devices: str | None = field(default=None, metadata={
        "help": "CUDA_VISIBLE_DEVICES for the server and trainer (GPU or MIG UUIDs; empty: no GPU); absent: left as it is"})

    def resolve_path(self, layout: Layout) -> Path:
        """The model path under the root the process was started with."""
        return layout.root / self.path.lstrip("/")


@dataclass(frozen=True)
class EmbeddingsConfig:
    path: str = field(metadata={"help": "the embedding model's directory (safetensors, tokenizer), absolute as seen on the target"})
    id: str = field(default="embeddings", metadata={"help": "embedding model name the API reports"})
    context_length: int = field(default=256, metadata={
        "help": "tokens one input may have, the model's own two included; a longer input is a 400", "min": 8})
    device: str = field(default="cpu", metadata={"help": "where the embedding model runs", "choices": ("cpu", "cuda")})
    dtype: str = field(default="float32", metadata={"help": "weights dtype", "choices": DTYPES})
    threads: int = field(default=2, metadata={"help": "CPU threads torch computes with on device cpu", "min": 1})
    max_inputs: int = field(default=256, metadata={"help": "inputs one request may send; more is a 400", "min": 1})
    max_request_tokens: int = field(default=32768, metadata={
        "help": "tokens of all of one request's inputs together; more is a 400", "min": 8})
    max_batch: int = field(default=32, metadata={"help": "inputs embedded together, from one request or several", "min": 1, "max": 1024})
    batch_wait_ms: int = field(default=5, metadata={
        "help": "how long the first input waits for others to share its batch", "min": 0, "max": 10000})
    max_queue: int = field(default=1024, metadata={"help": "inputs waiting for a batch; a request that would pass it gets 429", "min": 1})

    def resolve_path(self, layout: Layout) -> Path:
        return layout.root / self.path.lstrip("/")


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    model: ModelConfig
    source: Path | None = None
    embeddings: EmbeddingsConfig | None = None  # absent: the bundle carries no embedding model


SECTIONS = ("server", "model", "trainer", "embeddings")
_KINDS = {"str": "a string", "str | None": "a string", "int": "a whole number", "float": "a number",
          "bool": "true or false", "tuple[int, ...]": "a list of GPU indices (whole numbers)",
          "list[str]": "a non-empty list of names", "tuple[str, ...]": "a list of strings"}


def _typed(kind: str, v: Any) -> Any:
    """`v` as a value of the field's type, or None when it is not one. bool is an int in Python; a
    port of `true` is still a mistake."""
    def whole(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if kind in ("str", "str | None"):
        return v if isinstance(v, str) else None
    if kind == "bool":
        return v if isinstance(v, bool) else None
    if kind == "int":
        return v if whole(v) else None
    if kind == "float":
        return float(v) if whole(v) or isinstance(v, float) else None
    if kind == "tuple[int, ...]":
        return tuple(v) if isinstance(v, list) and all(whole(x) and x >= 0 for x in v) else None
    if kind == "list[str]":
        return list(v) if isinstance(v, list) and v and all(isinstance(x, str) and x for x in v) else None
    if kind == "tuple[str, ...]":
        return tuple(v) if isinstance(v, list) and all(isinstance(x, str) and x for x in v) else None
    raise TypeError(f"no validator for a setting of type {kind}")


def validate_section(cls: type, section: str, raw: Any, where: str | None = None,
                     error: type[ApplianceError] = ConfigError) -> Any:
    """The one validator of appliance.toml: a section's table as `cls` (a dataclass whose fields carry
    `help` and optional `min`, `max`, `choices`). An unknown key, a wrong type, an out-of-range value
    or a missing required key is `error`, naming the key and what it must be."""
    where = where or f"[{section}]"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise error(f"{where} is not a table.")
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise error(f"{where} has no setting {unknown[0]!r}; the settings of [{section}] are {', '.join(known)}.",
                    "Correct or remove it (a misspelt key would otherwise be ignored), then start again.")
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name not in raw:
            continue
        kind, help_ = str(f.type), f.metadata["help"]
        v = _typed(kind, raw[f.name])
        if v is None:
            raise error(f"{where} {f.name} must be {_KINDS[kind]} ({help_}), not {raw[f.name]!r}.")
        lo, hi = f.metadata.get("min"), f.metadata.get("max")
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            bounds = f"at least {lo}" if hi is None else (str(lo) if lo == hi else f"between {lo} and {hi}")
            raise error(f"{where} {f.name} is {v!r}; it must be {bounds} ({help_}).")
        if "choices" in f.metadata and v not in f.metadata["choices"]:
            raise error(f"{where} {f.name} must be one of {', '.join(f.metadata['choices'])}, not {v!r}.")
        values[f.name] = v
    try:
        return cls(**values)
    except TypeError:
        missing = [f.name for f in fields(cls) if f.name not in values]
        raise error(f"{where} is missing {', '.join(missing)}.") from None


def use_devices(model: ModelConfig) -> None:
    """Make CUDA see exactly the GPUs the installer planned for (none for a CPU tier); before anything
    initialises CUDA."""
    import os

    if model.cuda_visible_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = model.cuda_visible_devices


def model_config(raw: dict[str, Any]) -> ModelConfig:
    """A [model] section given as values (the installer's tier settings), validated like the file."""
    return validate_section(ModelConfig, "model", raw)  # type: ignore[no-any-return]


def parse_config(text: str, source: Path | None = None) -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"The config {source or ''} is not valid TOML: {e}.".replace("  ", " ")) from None
    if "model" not in raw:
        raise ConfigError(f"The config {source or ''} has no [model] section.".replace("  ", " "),
                          "Install a bundle first; the installer writes [model].")
    stray = sorted(set(raw) - set(SECTIONS))
    if stray:
        raise ConfigError(f"The config {source or ''} has a section [{stray[0]}] the appliance does not read; "
                          f"its sections are {', '.join(f'[{s}]' for s in SECTIONS)}.".replace("  ", " "),
                          "Correct or remove it and start again.")
    embeddings = validate_section(EmbeddingsConfig, "embeddings", raw["embeddings"]) if "embeddings" in raw else None
    return Config(validate_section(ServerConfig, "server", raw.get("server")), validate_section(ModelConfig, "model", raw["model"]),
                  source, embeddings)


def load_config(layout: Layout, path: Path | None = None) -> Config:
    """Read the installed config (or `path`, e.g. `--config F`)."""
    path = Path(path) if path else layout.config_file
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"The config file {path} does not exist.", "Install a bundle first (`appliance install`), or pass --config.") from None
    except OSError as e:
        raise ConfigError(f"The config file {path} cannot be read: {e.strerror}.") from None
    return parse_config(text, path)
