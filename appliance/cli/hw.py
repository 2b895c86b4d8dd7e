"""`appliance hw`: the machine (probed, or a recorded machine file) and which tier of a bundle fits it, and why."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError, UsageError
from appliance.paths import Layout
from installer.hardware.machine import Machine, gib, load_machine, save_machine
from installer.planning.planner import RUNNABLE, Plan, plan
from installer.planning.tiers import Tier, models_of, parse_tiers

REPO_DEMO_SPEC = Path(__file__).resolve().parents[2] / "bundles" / "demo.toml"


def _bundle_tiers(path: Path, args: argparse.Namespace) -> tuple[list[Tier], str]:
    """Tiers from a bundle directory (signature checked when a trusted key is at hand) or a spec file;
    a verified bundle's manifest is kept in args.verified_manifest (its wheels may then be opened)."""
    if path.is_file() and path.suffix == ".toml":
        from installer.toolchain.spec import load_spec

        spec = load_spec(path)
        return parse_tiers(spec.tiers, models_of(spec.models)), f"spec {path} ({spec.name} {spec.version})"
    from installer.bundle.manifest import MAX_MANIFEST_BYTES, parse_manifest
    from installer.bundle.reader import read_bounded, read_signed

    if path.is_file():  # an installed release's manifest.json
        raw, checked = read_bounded(path, MAX_MANIFEST_BYTES), "installed"
    else:
        raw, sig = read_signed(path)
        checked = "signature unchecked"
        if args.trust or Layout.at(args.root).trust_dir.is_dir():
            from installer.bundle.keys import load_trusted_keys
            from installer.bundle.trust import check_signature

            check_signature(raw, sig, load_trusted_keys(args.trust or [Layout.at(args.root).trust_dir]))
            checked = "signature verified"
    m = parse_manifest(raw)
    args.bundle_runtimes = m.runtimes  # a tier whose runtime variant the bundle lacks is incompatible
    if checked == "signature verified":
        args.verified_manifest = m
    return parse_tiers(m.tiers, models_of(m.models)), f"bundle {path} ({m.name} {m.version}, {checked})"


def _tiers(args: argparse.Namespace) -> tuple[list[Tier], str]:
    from installer.bundle.manifest import MANIFEST

    if args.bundle:
        return _bundle_tiers(Path(args.bundle), args)
    installed = Layout.at(args.root).current / MANIFEST  # the installed release keeps its bundle's signed manifest
    if installed.is_file():
        return _bundle_tiers(installed, args)
    if REPO_DEMO_SPEC.is_file():  # a source checkout: show the demo bundle's table
        return _bundle_tiers(REPO_DEMO_SPEC, args)
    return [], "no bundle (pass --bundle DIR)"


def _machine(args: argparse.Namespace) -> Machine:
    if args.machine:
        if args.record:
            raise UsageError("--record saves what the probe sees; it cannot be combined with --machine.")
        return load_machine(Path(args.machine))
    from installer.hardware.probe import probe

    machine = probe(Layout.at(args.root).root)
    if args.record:
        save_machine(machine, Path(args.record))
    return machine


def _llama_lib(args: argparse.Namespace, tmp: Path) -> tuple[Path | None, str | None, str]:
    """The llama_cpp/lib folder whose CPU variants this host would choose from, the python to ask
    with, and where it comes from; None when there is nothing that may be opened."""
    from appliance.engines import cpu_backend

    if args.bundle:
        m = getattr(args, "verified_manifest", None)
        entry = next((f for f in m.files if Path(f.path).name.startswith("llama_cpp_python-")), None) if m else None
        if entry is None:
            return None, None, "the bundle's signature was not checked (pass --trust)" if m is None else "the bundle carries no llama.cpp"
        import zipfile

        from installer.bundle.reader import copy_verified

        wheel = tmp / Path(entry.path).name
        copy_verified(Path(args.bundle), entry, wheel)  # only bytes the signed manifest lists are opened
        with zipfile.ZipFile(wheel) as z:
            for n in z.namelist():
                if n.startswith("llama_cpp/lib/") and ".so" in n:
                    (tmp / Path(n).name).write_bytes(z.read(n))
        return tmp, None, f"the bundle's {entry.path}"
    cur = Layout.at(args.root).current
    libs = sorted(cur.glob("venv/lib/python3*/site-packages/llama_cpp/lib"))
    if libs:
        return libs[0], str(cur / "venv" / "bin" / "python"), "the installed release"
    try:
        return cpu_backend.package_lib(), None, "this environment"
    except ApplianceError:
        return None, None, "no llama.cpp here"


def llama_variant(args: argparse.Namespace) -> dict[str, Any]:
    """Which llama.cpp CPU variant would load on this host, asked of the libraries themselves."""
    import tempfile

    from appliance.engines import cpu_backend

    if args.machine:
        return {"variant": None, "why": "a recorded machine: the variant is chosen on the host itself"}
    with tempfile.TemporaryDirectory(prefix="appliance-hw-") as tmp:
        lib, python, source = _llama_lib(args, Path(tmp))
        if lib is None:
            return {"variant": None, "why": source}
        carried = cpu_backend.variants(lib)
        if not carried:
            return {"variant": None, "why": f"{source} has a single CPU library (not the portable build)"}
        best, scores = cpu_backend.choose(lib, python)
    return {"variant": best, "scores": scores, "source": source,
            "why": f"of the {', '.join(carried)} that {source} carries" if best else f"none of {source}'s variants runs on this CPU"}


def render(p: Plan, source: str, engine: dict[str, Any] | None = None) -> str:
    """The plan as a table for people."""
    m = p.machine
    lines = [f"GPUs      {m.summary()}"]
    for g in m.gpus:
        mem = "memory unknown" if g.memory_total_mib is None else f"{gib(g.memory_free_mib or 0)} of {gib(g.memory_total_mib)} GiB free"
        lines.append(f"  GPU {g.index}   {g.name or 'unknown'}  {g.pci_device_id or '?'}  cc {g.compute_capability or '?'}  {mem}"
                     + (f"  MIG: {', '.join(f'{d.name or d.index} {gib(d.memory_free_mib or 0)} GiB free' for d in g.mig_devices)}" if g.mig_enabled else ""))
    lines.append(f"CPU       {m.cpu.model}, {m.cpu.physical_cores} physical / {m.cpu.logical_cores} logical cores"
                 + (f"  ({m.cpu.isa})" if m.cpu.isa else ""))
    if engine is not None:
        lines.append(f"llama.cpp the {engine['variant']} CPU variant loads here, {engine['why']}" if engine["variant"]
                     else f"llama.cpp CPU variant not known: {engine['why']}")
    lines.append(f"RAM       {gib(m.ram_mib)} GiB    free disk at the install root: {gib(m.disk_free_mib)} GiB")
    lines += [f"note      {n}" for n in m.notes]
    lines.append("")
    if not p.tiers:
        lines.append(f"tiers     {source}")
        return "\n".join(lines)
    lines.append(f"tiers of the {source}, most preferred first:")
    width = max(len(t.name) for t in p.tiers)
    for t, v in zip(p.tiers, p.verdicts, strict=True):
        mark = "*" if p.chosen is t else " "
        lines.append(f"{mark} {t.name:<{width}}  {v.verdict:<12}  {t.backend} {t.dtype or t.quantization or ''}".rstrip())
        lines += [f"  {'':<{width}}  {'':<12}  - {r}" for r in v.reasons]
    lines.append("")
    lines.append(f"chosen    {p.reason}" if p.chosen else f"chosen    none. {p.reason}")
    return "\n".join(lines)


def cmd_hw(args: argparse.Namespace) -> int:
    machine = _machine(args)
    tiers, source = _tiers(args)
    p = plan(machine, tiers, getattr(args, "bundle_runtimes", None))
    engine = llama_variant(args)
    if args.json:
        out: dict[str, Any] = p.to_json()
        out["source"] = source
        out["llama_cpp_cpu"] = engine
        print(json.dumps(out, indent=2))
    else:
        print(render(p, source, engine))
        if args.record:
            print(f"\nrecorded this machine to {args.record}")
    # Exit 0 when a tier can run: scripts can ask `appliance hw --bundle DIR` whether a box will do.
    return 0 if not tiers or any(v.verdict == RUNNABLE for v in p.verdicts) else 4


def add_parser(sub: argparse._SubParsersAction, root_parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("hw", help="GPUs, CPU, RAM, disk, and which tier of a bundle fits, with reasons", parents=[root_parent])
    p.add_argument("--machine", metavar="FILE", help="plan for a recorded machine file instead of probing this one")
    p.add_argument("--record", metavar="FILE", help="save this machine's probe as a machine file (to send to the vendor)")
    p.add_argument("--bundle", metavar="DIR", help="bundle directory (or spec .toml) whose tiers to judge; default: the installed one")
    p.add_argument("--trust", action="append", help="trusted vendor public key for --bundle (default: the pinned keys under --root)")
    p.add_argument("--json", action="store_true", help="machine-readable: chosen, reason, tiers, machine")
    p.set_defaults(func=cmd_hw)
