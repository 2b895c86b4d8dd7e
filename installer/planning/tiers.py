"""The tier table of a bundle: what each tier needs and what it runs. Pure: parse and validate, no I/O.

A tier in the spec (TOML) or manifest (JSON), most preferred first:

    [[tiers]]
    name = "gpu"
    model = "smollm2-135m-instruct-bf16"     # a model id of the same bundle
    backend = "transformers"                 # must match the model's backend
    dtype = "bfloat16"                       # transformers: bfloat16 | float16 | float32
    replicas = 1                             # or "per-gpu": one replica on each GPU that qualifies
    context_length = 8192
    runtime = "cuda"                         # the bundle's wheelhouse variant (default: cuda with GPUs, else cpu)
    embeddings = "all-minilm-l6-v2"          # optional: a transformers model of the bundle for /v1/embeddings
    lora = { rank = 16, alpha = 32, targets = ["q_proj", "v_proj"] }
    trainer = { batch_size = 16 }
    needs = { gpu_count = 1, gpu_memory_mib = 8192, compute_capability = "8.0", cuda = "12.1" }

See bundles/README.md ("Tiers") for every key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from appliance.config import BACKENDS, DTYPES
from appliance.errors import TierError
from installer.bundle.manifest import RUNTIMES
from installer.hardware.machine import version_tuple

PER_GPU = "per-gpu"
PHYSICAL_CORES = "physical-cores"
ALL_LAYERS = -1  # llama.cpp's n_gpu_layers for "every layer on the GPU"
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}\Z")
_VERSION = re.compile(r"^\d+(\.\d+)*\Z")
_PCI_ID = re.compile(r"^0x[0-9A-Fa-f]{8}\Z")
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*\Z")
_TOP_KEYS = {"name", "description", "model", "backend", "dtype", "quantization", "gpu_layers", "replicas",
             "tensor_parallel", "threads", "context_length", "embeddings", "lora", "trainer", "needs", "runtime"}
_NEED_KEYS = {"gpu_count", "gpu_memory_mib", "compute_capability", "driver", "cuda", "ram_mib", "disk_mib", "pci_device_ids"}


@dataclass(frozen=True)
class Needs:
    """What a tier needs from the machine. Per-GPU figures apply to each of `gpu_count` GPUs."""

    gpu_count: int = 0
    gpu_memory_mib: int = 0  # free memory on each GPU it uses
    compute_capability: str | None = None  # minimum, "8.0"
    driver: str | None = None  # minimum driver version, "525.60.13"
    cuda: str | None = None  # minimum CUDA version the driver must support: the bundle's CUDA build
    ram_mib: int = 0
    disk_mib: int = 0  # free disk at the install root
    pci_device_ids: tuple[str, ...] = ()  # allowed GPUs ("0x20B210DE"); empty: any


@dataclass(frozen=True)
class Tier:
    """One row of the tier table: its needs, and the settings the installer writes to appliance.toml."""

    name: str
    description: str
    model: str  # model id in the bundle
    backend: str  # "llama.cpp" | "transformers"
    dtype: str | None  # transformers weights dtype; None on llama.cpp (the GGUF file fixes it)
    quantization: str | None  # informative, e.g. "Q4_K_M" for a GGUF
    gpu_layers: int  # llama.cpp: 0 on CPU, ALL_LAYERS for all
    replicas: int | str  # an int, or PER_GPU
    tensor_parallel: int  # GPUs one replica spans
    threads: int | str  # an int, or PHYSICAL_CORES
    context_length: int
    lora_rank: int
    lora_alpha: int
    lora_targets: tuple[str, ...]
    batch_size: int  # trainer batch size
    needs: Needs
    embeddings: str | None = None  # the model id of the bundle's embedding model this tier serves, if any
    runtime: str = "cpu"  # the wheelhouse variant its venv is built from (wheels/<runtime>/)

    @property
    def uses_gpu(self) -> bool:
        return self.needs.gpu_count > 0

    def gpus_wanted(self, qualifying: int) -> int:
        """How many of the `qualifying` GPUs this tier puts to work."""
        if not self.uses_gpu:
            return 0
        if self.replicas == PER_GPU:
            return max(self.needs.gpu_count, qualifying - qualifying % self.tensor_parallel)
        return self.needs.gpu_count

    def model_settings(self, physical_cores: int, gpus: Iterable[int] = (), devices: Iterable[str] = ()) -> dict[str, Any]:
        """The [model] keys of appliance.toml for this tier (the installer adds `path`).

        `gpus` are NVML indices; `devices` the CUDA_VISIBLE_DEVICES value for them (UUIDs), which
        the server's unit sets so that CUDA sees exactly the planned GPUs or MIG instance.
        """
        gpu_list = list(gpus)
        replicas = len(gpu_list) // self.tensor_parallel if self.replicas == PER_GPU else int(self.replicas)
        out: dict[str, Any] = {
            "tier": self.name, "id": self.model, "backend": self.backend, "context_length": self.context_length,
            "threads": physical_cores if self.threads == PHYSICAL_CORES else int(self.threads),
            "gpu_layers": self.gpu_layers, "replicas": max(1, replicas), "tensor_parallel": self.tensor_parallel,
            "gpus": gpu_list, "cuda_visible_devices": ",".join(devices),
        }
        if self.dtype is not None:
            out["dtype"] = self.dtype
        if self.quantization is not None:
            out["quantization"] = self.quantization
        return out

    def embedding_settings(self, threads: int) -> dict[str, Any]:
        """The [embeddings] keys of appliance.toml for this tier (the installer adds `path` and `context_length`);
        `threads` are the chat model's, as model_settings resolved them.

        On the GPU only beside a transformers chat model, whose CUDA context it shares; beside llama.cpp
        on the CPU, where torch's own CUDA context would take GPU memory the tier's needs do not count."""
        if self.embeddings is None:
            return {}
        on_gpu = self.uses_gpu and self.backend == "transformers"
        return {"id": self.embeddings, "device": "cuda" if on_gpu else "cpu", "threads": threads}

    def trainer_settings(self) -> dict[str, Any]:
        """The [trainer] keys of appliance.toml that come from the tier."""
        return {"lora_rank": self.lora_rank, "lora_alpha": self.lora_alpha,
                "lora_targets": list(self.lora_targets), "batch_size": self.batch_size}


class _Table:
    """Typed reads from one tier's table, with errors that name the tier and the key."""

    def __init__(self, data: Any, where: str, allowed: set[str]) -> None:
        if not isinstance(data, Mapping):
            raise TierError(f"The {where} is not a table.")
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise TierError(f"The {where} has an unknown key {unknown[0]!r}.", f"Known keys: {', '.join(sorted(allowed))}.")
        self.data, self.where = data, where

    def get(self, key: str, typ: type | tuple[type, ...], default: Any = None, required: bool = False) -> Any:
        if key not in self.data:
            if required:
                raise TierError(f"The {self.where} has no {key!r}.")
            return default
        value = self.data[key]
        if not isinstance(value, typ) or (isinstance(value, bool) and typ is not bool):
            raise TierError(f"The {self.where}.{key} = {value!r} has the wrong type.")
        return value

    def count(self, key: str, default: int, low: int = 0) -> int:
        value = int(self.get(key, int, default))
        if value < low:
            raise TierError(f"The {self.where}.{key} = {value} must be at least {low}.")
        return value

    def version(self, key: str) -> str | None:
        value = self.get(key, str)
        if value is not None and not _VERSION.match(value):
            raise TierError(f"The {self.where}.{key} = {value!r} is not a dotted version like '8.0'.")
        return value


def _needs(data: Any, where: str) -> Needs:
    t = _Table(data if data is not None else {}, f"{where}.needs", _NEED_KEYS)
    pci = t.get("pci_device_ids", list, [])
    for p in pci:
        if not isinstance(p, str) or not _PCI_ID.match(p):
            raise TierError(f"The {where}.needs.pci_device_ids holds {p!r}, not a PCI id like '0x20B210DE'.")
    return Needs(
        gpu_count=t.count("gpu_count", 0), gpu_memory_mib=t.count("gpu_memory_mib", 0),
        compute_capability=t.version("compute_capability"), driver=t.version("driver"), cuda=t.version("cuda"),
        ram_mib=t.count("ram_mib", 0), disk_mib=t.count("disk_mib", 0),
        pci_device_ids=tuple(p[:2].lower() + p[2:].upper() for p in pci),
    )


def _placement(t: _Table, where: str, needs: Needs) -> tuple[int, int | str, int, int | str]:
    """Where the model runs: GPU layers, replicas, tensor parallelism, CPU threads."""
    layers = t.get("gpu_layers", (int, str), ALL_LAYERS if needs.gpu_count else 0)
    if layers == "all":
        layers = ALL_LAYERS
    if not isinstance(layers, int) or layers < ALL_LAYERS:
        raise TierError(f"The {where}.gpu_layers must be a layer count or \"all\".")
    if layers != 0 and not needs.gpu_count:
        raise TierError(f"The {where} puts layers on a GPU but needs no GPU.", "Set needs.gpu_count, or gpu_layers = 0.")
    replicas = t.get("replicas", (int, str), 1)
    if replicas != PER_GPU and (not isinstance(replicas, int) or replicas < 1):
        raise TierError(f"The {where}.replicas must be a positive count or \"{PER_GPU}\".")
    tp = t.count("tensor_parallel", 1, low=1)
    if needs.gpu_count and isinstance(replicas, int) and replicas * tp > needs.gpu_count:
        raise TierError(f"The {where} runs {replicas} replica(s) over {tp} GPU(s) each but needs only {needs.gpu_count} GPUs.")
    if (replicas == PER_GPU or tp > 1) and not needs.gpu_count:
        raise TierError(f"The {where} spreads over GPUs but needs none.")
    threads = t.get("threads", (int, str), PHYSICAL_CORES)
    if threads != PHYSICAL_CORES and (not isinstance(threads, int) or threads < 1):
        raise TierError(f"The {where}.threads must be a positive count or \"{PHYSICAL_CORES}\".")
    return layers, replicas, tp, threads


def _embeddings(t: _Table, where: str, model: str, models: Mapping[str, tuple[str, int]] | None) -> str | None:
    """The tier's embedding model: another model of the bundle, run with transformers (safetensors)."""
    name = t.get("embeddings", str)
    if name is None or models is None:
        return name  # type: ignore[no-any-return]
    if name not in models:
        raise TierError(f"The {where} names the embedding model {name!r}, which the bundle does not have.", f"Models: {', '.join(models) or 'none'}.")
    if name == model:
        raise TierError(f"The {where} names {name!r} both as its model and as its embedding model.",
                        "Name a sentence-embedding model of the bundle in 'embeddings', or leave it out.")
    if models[name][0] != "transformers":
        raise TierError(f"The {where} names the embedding model {name!r}, which is for {models[name][0]}; "
                        "embedding models run on transformers (safetensors).")
    return name


def _runtime(t: _Table, where: str, needs: Needs) -> str:
    """The runtime variant: cuda for tiers with GPUs, cpu otherwise, unless the tier names one. A GPU
    tier never runs the cpu runtime: its engine would run on the CPU."""
    runtime = t.get("runtime", str, "cuda" if needs.gpu_count else "cpu")
    if runtime not in RUNTIMES:
        raise TierError(f"The {where}.runtime = {runtime!r} is not a runtime variant; use {' or '.join(RUNTIMES)}.")
    if runtime == "cpu" and needs.gpu_count:
        raise TierError(f"The {where} needs GPUs but names the cpu runtime, whose torch and llama.cpp cannot use them.",
                        "Leave out runtime (GPU tiers run the cuda runtime), or set needs.gpu_count = 0.")
    return str(runtime)


def parse_tier(data: Any, where: str, models: Mapping[str, tuple[str, int]] | None = None) -> Tier:
    """One tier; `models` maps model id -> (backend, context_length) to check references against."""
    t = _Table(data, where, _TOP_KEYS)
    name = t.get("name", str, required=True)
    if not _NAME.match(name):
        raise TierError(f"The {where} name {name!r} must be lowercase letters, digits and dashes.")
    where = f"{where} ({name})"
    t.where = where
    model = t.get("model", str, required=True)
    backend = t.get("backend", str)
    context = t.count("context_length", 0, low=1) if "context_length" in t.data else None
    if models is not None:
        if model not in models:
            raise TierError(f"The {where} names the model {model!r}, which the bundle does not have.", f"Models: {', '.join(models) or 'none'}.")
        backend = backend or models[model][0]
        if backend != models[model][0]:
            raise TierError(f"The {where} runs {model!r} on {backend}, but that model is for {models[model][0]}.")
        if context is not None and context > models[model][1]:
            raise TierError(f"The {where} asks for a {context}-token context; the model {model!r} supports {models[model][1]}.")
        context = context or models[model][1]
    if backend not in BACKENDS:
        raise TierError(f"The {where} has backend {backend!r}; use llama.cpp or transformers.")
    if context is None:
        raise TierError(f"The {where} has no 'context_length'.")
    needs = _needs(data.get("needs"), where)
    embeddings = _embeddings(t, where, model, models)
    runtime = _runtime(t, where, needs)

    dtype = t.get("dtype", str)
    if backend == "transformers" and dtype not in DTYPES:
        raise TierError(f"The {where} runs transformers with dtype {dtype!r}; use one of {', '.join(DTYPES)}.")
    if backend == "llama.cpp" and dtype is not None:
        raise TierError(f"The {where} sets dtype for llama.cpp, where the GGUF file fixes it.", "Name it in 'quantization' instead.")
    if dtype == "bfloat16" and needs.gpu_count and (needs.compute_capability is None or version_tuple(needs.compute_capability) < (8,)):
        raise TierError(f"The {where} runs bfloat16 on GPUs without requiring compute capability 8.0 (Ampere), the first with bf16.")
    layers, replicas, tp, threads = _placement(t, where, needs)
    lora = _Table(t.get("lora", Mapping, {}), f"{where}.lora", {"rank", "alpha", "targets"})
    targets = lora.get("targets", list, ["q_proj", "v_proj"])
    if not targets or not all(isinstance(x, str) and _MODULE.match(x) for x in targets):
        raise TierError(f"The {where}.lora.targets must be a non-empty list of module names like 'q_proj'.")
    trainer = _Table(t.get("trainer", Mapping, {}), f"{where}.trainer", {"batch_size"})
    return Tier(
        name=name, description=t.get("description", str, ""), model=model, backend=backend, dtype=dtype,
        quantization=t.get("quantization", str), gpu_layers=layers, replicas=replicas, tensor_parallel=tp,
        threads=threads, context_length=context, lora_rank=lora.count("rank", 8, low=1),
        lora_alpha=lora.count("alpha", 16, low=1), lora_targets=tuple(targets),
        batch_size=trainer.count("batch_size", 8, low=1), needs=needs, embeddings=embeddings, runtime=runtime,
    )


def parse_tiers(tiers: Iterable[Any], models: Mapping[str, tuple[str, int]] | None = None) -> list[Tier]:
    """The whole table, most preferred first. Raises TierError naming the first bad tier and key."""
    out: list[Tier] = []
    for i, data in enumerate(tiers):
        tier = parse_tier(data, f"tier {i + 1}", models)
        if any(t.name == tier.name for t in out):
            raise TierError(f"The tier table names {tier.name!r} twice.")
        out.append(tier)
    return out  # empty is allowed here; the planner then says no tier can run


def models_of(manifest_models: Iterable[Any]) -> dict[str, tuple[str, int]]:
    """model id -> (backend, context_length) from manifest or spec models (anything with those attributes)."""
    return {m.id: (m.backend, m.context_length) for m in manifest_models}
