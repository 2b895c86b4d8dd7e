"""`appliance bundle ...`: keygen, build, verify, inspect. Thin shells over the pure core."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from appliance.errors import BundleError
from appliance.paths import Layout
from appliance.state import load_install_state
from installer.bundle.trust import Policy, host_platform


def _policy(args: argparse.Namespace) -> Policy:
    state = load_install_state(Layout.at(args.root))
    platform = None if args.any_platform else (args.platform or host_platform())
    return Policy.from_state(state, platform)


def _trusted(args: argparse.Namespace) -> list[Any]:
    from installer.bundle.keys import load_trusted_keys

    pinned = Layout.at(args.root).trust_dir
    return load_trusted_keys(args.trust or ([pinned] if pinned.is_dir() else []))


def cmd_keygen(args: argparse.Namespace) -> int:
    from installer.toolchain.keygen import keygen

    info = keygen(Path(args.out), force=args.force, only=args.only)
    if args.json:
        print(json.dumps(info))
        return 0
    if "signing_key" in info:
        print(f"signing key  {info['signing_key']}  (keep it with the vendor, 0600)")
        print(f"public key   {info['signing_pub']}  fingerprint {info['fingerprint']}")
    if "model_key" in info:
        print(f"model key    {info['model_key']}  (carry it to the site on a second stick, 0600)")
    return 0


def cmd_build(args: argparse.Namespace) -> int:
    from installer.toolchain.build import build_bundle
    from installer.toolchain.spec import load_spec
    from installer.toolchain.wheelhouse import parse_runtimes

    spec = load_spec(Path(args.spec))
    manifest = build_bundle(
        spec, Path(args.out), Path(args.signing_key), sequence=args.sequence,
        model_key_path=Path(args.model_key) if args.model_key else None,
        passphrase_path=Path(args.passphrase_file) if args.passphrase_file else None,
        log=lambda m: print(f"  {m}", file=sys.stderr), runtimes=parse_runtimes(args.runtime), cuda_llama=not args.no_cuda_llama,
    )
    total = sum(f["size"] for f in manifest["files"])
    print(f"built {manifest['name']} {manifest['version']} sequence {manifest['sequence']} in {args.out}: "
          f"{len(manifest['files'])} files, {total / 2**20:.1f} MiB")
    for runtime in parse_runtimes(args.runtime):
        size = sum(f["size"] for f in manifest["files"] if f["path"].startswith(f"wheels/{runtime}/"))
        print(f"  runtime {runtime}: wheels/{runtime}/ {size / 2**30:.2f} GiB")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from installer.bundle.keys import fingerprint
    from installer.bundle.reader import verify_bundle

    def progress(path: str, done: int, total: int) -> None:
        if done == total and args.verbose:
            print(f"  ok  {path}  {total} bytes", file=sys.stderr)

    manifest, signer = verify_bundle(Path(args.dir), _trusted(args), _policy(args), progress)
    result = {"ok": True, "name": manifest.name, "version": manifest.version, "sequence": manifest.sequence,
              "files": len(manifest.files), "bytes": sum(f.size for f in manifest.files),
              "signed_by": fingerprint(signer), "expires_at": manifest.raw["expires_at"]}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"verified {manifest.name} {manifest.version} sequence {manifest.sequence}: "
              f"{result['files']} files, {result['bytes'] / 2**20:.1f} MiB, signed by {result['signed_by']}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from installer.bundle.keys import fingerprint
    from installer.bundle.manifest import parse_manifest
    from installer.bundle.reader import read_signed
    from installer.bundle.trust import check_signature

    raw, sig = read_signed(Path(args.dir))
    signature = "unchecked (pass --trust, or verify)"
    if args.trust or Layout.at(args.root).trust_dir.is_dir():
        signature = "verified, " + fingerprint(check_signature(raw, sig, _trusted(args)))
    m = parse_manifest(raw)
    if args.json:
        print(json.dumps({"signature": signature, "manifest": m.raw}))
        return 0
    if getattr(args, "sbom", False):
        doc = m.raw.get("sbom")
        if not isinstance(doc, dict):
            raise BundleError("This bundle's SBOM is a plain list of wheels made before CycloneDX; `--json` shows it.",
                              "Ask the vendor for a bundle built by this release of the toolchain.")
        print(json.dumps(doc, indent=2))
        return 0
    print(f"bundle      {m.name} {m.version}  sequence {m.sequence}")
    print(f"signature   {signature}")
    print(f"issued      {m.raw['issued_at']}   expires {m.raw['expires_at']}")
    print(f"platform    {m.compatible}")
    print(f"model key   {m.key_wrap.kind}")
    for model in m.models:
        size = sum(f.plain_size for f in model.files)
        print(f"model       {model.id}  {model.backend}/{model.format}  context {model.context_length}  {size / 2**20:.1f} MiB")
    for tier in m.tiers:
        print(f"tier        {tier.get('name', '?')}")
    print(f"files       {len(m.files)}, {sum(f.size for f in m.files) / 2**20:.1f} MiB")
    for runtime in sorted(m.runtimes):  # wheels/<runtime>/: one complete wheelhouse per runtime variant
        wheels = [w for w in m.sbom if w["path"].startswith(f"wheels/{runtime}/")]
        print(f"wheels      {runtime}: {len(wheels)}: " + ", ".join(f"{w['name']} {w['version']}" for w in wheels[:8])
              + (" ..." if len(wheels) > 8 else ""))
    return 0


def add_parser(sub: argparse._SubParsersAction, root_parent: argparse.ArgumentParser) -> None:
    bundle = sub.add_parser("bundle", help="make keys, build, verify and inspect bundles")
    bsub = bundle.add_subparsers(dest="bundle_cmd", required=True, metavar="{keygen,build,verify,inspect}")

    p = bsub.add_parser("keygen", help="make a vendor signing key pair and a model key")
    p.add_argument("--out", required=True, help="directory for signing.key, signing.pub, model.key")
    p.add_argument("--force", action="store_true", help="overwrite existing keys")
    p.add_argument("--only", choices=("signing", "model"),
                   help="only the signing key pair (rotating it) or only a model key (one more site)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_keygen)

    p = bsub.add_parser("build", help="build a signed, encrypted bundle from a spec")
    p.add_argument("spec", help="bundle spec (TOML), e.g. bundles/demo.toml")
    p.add_argument("--signing-key", required=True)
    key = p.add_mutually_exclusive_group(required=True)
    key.add_argument("--model-key", help="32-byte model key file")
    key.add_argument("--passphrase-file", help="wrap the data keys with this passphrase instead")
    p.add_argument("--out", required=True)
    p.add_argument("--sequence", type=int, default=1, help="monotonically increasing release number")
    p.add_argument("--runtime", default="cpu", metavar="cpu|cuda|cpu,cuda",
                   help="runtime variants of the wheelhouse (cuda: torch's CUDA build and its NVIDIA libraries, several GB, cached)")
    p.add_argument("--no-cuda-llama", action="store_true",
                   help="carry the portable llama.cpp in the cuda runtime instead of building it with CUDA (its llama.cpp GPU tiers then refuse to start)")
    p.set_defaults(func=cmd_build)

    for name, func, text in (("verify", cmd_verify, "check signature, policy and every file"),
                             ("inspect", cmd_inspect, "show what a bundle holds")):
        p = bsub.add_parser(name, help=text, parents=[root_parent])
        p.add_argument("dir", help="bundle directory")
        p.add_argument("--trust", action="append", help="trusted vendor public key (file or directory); default: the pinned keys under --root")
        p.add_argument("--json", action="store_true")
        p.add_argument("--platform", help="platform to check against (default: this host)")
        p.add_argument("--any-platform", action="store_true", help="do not check the platform")
        p.add_argument("-v", "--verbose", action="store_true", help="list every file as it checks out")
        if name == "inspect":
            p.add_argument("--sbom", action="store_true", help="print the wheelhouse's SBOM (CycloneDX JSON) and nothing else")
        p.set_defaults(func=func)
