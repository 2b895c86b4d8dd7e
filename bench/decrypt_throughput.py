"""Verify+decrypt of a bundle's model file against `sha256sum` of the same ciphertext, in one run.

Encrypts a random model file of --size into a slim bundle, then times
  (a) `sha256sum` of the ciphertext file (the baseline: just reading and hashing it once),
  (b) the appliance's one-pass verify+decrypt of it to disk (hash, authenticate, write, fsync, rename),
each in its own process, and reports the peak RSS of (b). Last line: `ratio=<b/a> rss_mib=<peak>`.

    .venv/bin/python bench/decrypt_throughput.py --size 2G
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DECRYPT = """
import sys, time
from datetime import datetime, timezone
from pathlib import Path
from installer.bundle import keywrap
from installer.bundle.reader import decrypt_model_file, load_manifest
from installer.bundle.keys import load_trusted_keys
from installer.bundle.trust import Policy, host_platform
bundle, keys, dest = map(Path, sys.argv[1:4])
t = time.perf_counter()
m, _ = load_manifest(bundle, load_trusted_keys([keys / "signing.pub"]), Policy(datetime.now(timezone.utc), host_platform()))
mf = m.models[0].files[0]
key = keywrap.unwrap_key(keywrap.read_key_file(keys / "model.key"), mf.wrapped_key, f"{m.name}:{mf.path}")
decrypt_model_file(bundle, m, mf, key, dest)
# VmHWM is the peak RSS of this process image alone (ru_maxrss would include the parent's, from before exec)
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def timed_child(argv: list[str]) -> tuple[float, str]:
    """Wall seconds of one child process, and what it printed."""
    t = time.perf_counter()
    proc = subprocess.run(argv, stdout=subprocess.PIPE, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), check=True)
    return time.perf_counter() - t, proc.stdout


def write_random(path: Path, size: int) -> None:
    block = os.urandom(1 << 20)
    with path.open("wb") as f:
        for i in range(0, size, len(block)):
            # vary each block cheaply so nothing downstream can deduplicate
            f.write(i.to_bytes(8, "little") + block[8 : min(len(block), size - i)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="2G", help="model file size, e.g. 256M or 2G (default 2G)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each side; the best is reported")
    ap.add_argument("--workdir", help="where to put the files (default: a temp dir on the same disk as the repo)")
    args = ap.parse_args()
    size = parse_size(args.size)

    from installer.toolchain.build import build_bundle
    from installer.toolchain.keygen import keygen
    from installer.toolchain.spec import load_spec

    base = Path(args.workdir) if args.workdir else REPO / "build"
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=base, prefix="bench-decrypt-") as tmp:
        work = Path(tmp)
        keygen(work / "keys")
        write_random(work / "model.bin", size)
        from tests.spec_files import one_model_spec, write_spec

        write_spec(work / "spec.toml", one_model_spec(work / "model.bin", name="bench", model_id="random", tiers=[]))
        build_bundle(load_spec(work / "spec.toml"), work / "bundle", work / "keys/signing.key", model_key_path=work / "keys/model.key")
        (work / "model.bin").unlink()
        ct = next((work / "bundle/models").rglob("*.enc"))

        a_runs, b_runs, rss_kib = [], [], []
        for _ in range(args.repeat):
            a_runs.append(timed_child(["sha256sum", str(ct)])[0])
            dest = work / "out/model.gguf"
            wall, out = timed_child([sys.executable, "-c", DECRYPT, str(work / "bundle"), str(work / "keys"), str(dest)])
            b_runs.append(wall)
            rss_kib.append(int(out.strip()))
            dest.unlink()
        a, b, rss = min(a_runs), min(b_runs), max(rss_kib) / 1024

    mib = size / (1 << 20)
    print(f"{'side':<44}{'best s':>9}{'MiB/s':>9}{'peak RSS MiB':>14}")
    print(f"{'(a) sha256sum of the ciphertext':<44}{a:>9.2f}{mib / a:>9.0f}{'':>14}")
    print(f"{'(b) verify+decrypt to disk (fsync, rename)':<44}{b:>9.2f}{mib / b:>9.0f}{rss:>14.1f}")
    print(f"size={mib:.0f}MiB repeat={args.repeat} (best of) cpus={os.cpu_count()}")
    print(f"ratio={b / a:.2f} rss_mib={rss:.0f}")


if __name__ == "__main__":
    main()
