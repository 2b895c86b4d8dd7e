"""systemd units rendered from the templates in systemd/ (pure), plus where the templates live.

Placeholders are `@NAME@`; rendering refuses to leave one unfilled. GPU tiers get the NVIDIA
device nodes and lose MemoryDenyWriteExecute (CUDA maps executable memory); CPU tiers get
PrivateDevices. A server bound to loopback may talk to loopback only. Both services see exactly the
GPUs (or MIG instance) the plan chose, by UUID in CUDA_VISIBLE_DEVICES (none on a CPU tier); a
trainer with more than one GPU runs under torchrun, one process per GPU.
"""

from __future__ import annotations

import ipaddress
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from appliance.errors import StateError
from appliance.paths import SERVER_UNIT, TIMER_UNIT, TRAINER_UNIT, UNITS
from appliance.tls import CERT_CREDENTIAL, KEY_CREDENTIAL

SERVER, TRAINER, TIMER = SERVER_UNIT, TRAINER_UNIT, TIMER_UNIT
ENABLE = (SERVER, TIMER)  # the trainer service runs only from its timer
SERVICE_USER = "appliance"
PREFIX = "/opt/appliance"

NVIDIA_DEVICES = """PrivateDevices=no
DevicePolicy=closed
# NVIDIA GPUs: /dev/nvidia[0-9]*, nvidiactl, nvidia-modeset (major 195), nvidia-uvm, MIG capabilities.
DeviceAllow=char-nvidia-frontend rw
DeviceAllow=char-nvidia-uvm rw
DeviceAllow=char-nvidia-caps r"""
CPU_DEVICES = "PrivateDevices=yes\nDevicePolicy=closed"
_PLACEHOLDER = re.compile(r"@([A-Z_]+)@")
_SCHEDULE = re.compile(r"^[A-Za-z0-9*:/,.~ -]{1,100}$")
_CREDENTIAL_PATH = re.compile(r"/[A-Za-z0-9._/-]{1,250}\Z")
_DEVICE_LIST = re.compile(r"[A-Za-z0-9,/-]{0,2000}\Z")  # GPU-<uuid>, MIG-<uuid>, or NVML indices


@dataclass(frozen=True)
class UnitSettings:
    backend: str = "llama.cpp"
    uses_gpu: bool = False
    host: str = "127.0.0.1"
    schedule: str = "*-*-* 03:00:00"
    user: str = SERVICE_USER
    prefix: str = PREFIX
    tls: tuple[str, str] | None = None  # [server] tls_cert, tls_key (absolute paths), passed as credentials
    cuda_visible_devices: str | None = None  # [model] cuda_visible_devices: the plan's GPUs; None: left as systemd has it
    trainer_processes: int = 1  # GPUs the trainer spreads over (torchrun, data parallel) when more than one


def templates_dir() -> Path:
    """systemd/ of a source checkout, or share/appliance/systemd of an installed wheel."""
    for d in (Path(__file__).resolve().parents[2] / "systemd", Path(sys.prefix) / "share/appliance/systemd"):
        if (d / SERVER).is_file():
            return d
    raise StateError("The systemd unit templates are missing from this installation of the appliance.",
                     "Reinstall the appliance wheel; it carries them under share/appliance/systemd.")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def fill(template: str, values: dict[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        if m[1] not in values:
            raise KeyError(f"template placeholder @{m[1]}@ has no value")
        return values[m[1]]

    return _PLACEHOLDER.sub(sub, template)


def render_units(s: UnitSettings, templates: dict[str, str]) -> dict[str, str]:
    """Unit name -> text. Pure: settings and template texts in, unit files out."""
    if not _SCHEDULE.match(s.schedule) or "\n" in s.schedule:
        raise StateError(f"The trainer schedule {s.schedule!r} in appliance.toml is not a systemd calendar expression.",
                         "Use e.g. \"*-*-* 03:00:00\"; `systemd-analyze calendar` checks one.")
    devices = NVIDIA_DEVICES if s.uses_gpu else CPU_DEVICES
    # llama.cpp on CPU never needs writable+executable memory; CUDA and torch's JIT kernels do.
    if not s.uses_gpu and s.backend == "llama.cpp":
        devices += "\nMemoryDenyWriteExecute=yes"
    if is_loopback(s.host):
        network = "IPAddressDeny=any\nIPAddressAllow=localhost"
    else:
        network = f"# Listening on {s.host}: clients from the network may connect (see [server] host)."
    values = {"PREFIX": s.prefix, "USER": s.user, "DEVICES": devices, "NETWORK": network, "SCHEDULE": s.schedule,
              "CREDENTIALS": _credentials(s.tls), "GPU_ENV": gpu_environment(s.cuda_visible_devices),
              "TRAINER_EXEC": trainer_exec(s.prefix, s.trainer_processes)}
    out = {}
    for name in UNITS:
        text = fill(templates[name], values)
        if name == TRAINER:  # the trainer never keeps MemoryDenyWriteExecute: torch's CPU kernels are JIT-compiled
            text = text.replace("\nMemoryDenyWriteExecute=yes", "")
        out[name] = text
    return out


def gpu_environment(devices: str | None) -> str:
    """CUDA_VISIBLE_DEVICES as the plan chose it: UUIDs (a MIG instance by its MIG- UUID), and NVML's
    PCI order for plain indices (CUDA's own order differs); empty: CUDA sees no GPU."""
    if devices is None:
        return "# CUDA_VISIBLE_DEVICES: not set by the installer ([model] cuda_visible_devices is absent)."
    if not _DEVICE_LIST.match(devices):
        raise StateError(f"[model] cuda_visible_devices = {devices!r} in appliance.toml is not a list of GPU UUIDs or indices.",
                         "Use comma-separated GPU-… or MIG-… UUIDs (as `appliance hw` shows them), or an empty string for none.")
    order = "" if any(d.startswith(("GPU-", "MIG-")) for d in devices.split(",")) or not devices else " CUDA_DEVICE_ORDER=PCI_BUS_ID"
    return f"Environment=CUDA_VISIBLE_DEVICES={devices}{order}"


def trainer_exec(prefix: str, processes: int) -> str:
    """One training process, or one per GPU under torchrun (data parallel; rendezvous on this host only)."""
    appliance = f"{prefix}/current/venv/bin/appliance train"
    if processes <= 1:
        return f"ExecStart={appliance}"
    return f"ExecStart={prefix}/current/venv/bin/torchrun --standalone --nproc-per-node={processes} --no-python {appliance}"


def _credentials(tls: tuple[str, str] | None) -> str:
    """The TLS files as systemd credentials: systemd reads them as root, the service (never root) gets a
    copy only it can read under $CREDENTIALS_DIRECTORY (appliance/tls.py)."""
    if tls is None:
        return "# HTTPS: set [server] tls_cert and tls_key; the files then come in as credentials here."
    for path in tls:
        if not _CREDENTIAL_PATH.match(path):
            raise StateError(f"The TLS file {path!r} in appliance.toml is not a plain absolute path.",
                             "Use a path such as /etc/appliance/tls/server.key (letters, digits, . _ - /).")
    return f"LoadCredential={CERT_CREDENTIAL}:{tls[0]}\nLoadCredential={KEY_CREDENTIAL}:{tls[1]}"


def load_templates(directory: Path | None = None) -> dict[str, str]:
    d = directory or templates_dir()
    return {name: (d / name).read_text() for name in UNITS}
