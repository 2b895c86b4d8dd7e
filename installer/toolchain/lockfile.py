"""requirements/lock.txt: every dependency of every extra, pinned with its SHA-256 hashes.

pip-compile writes it (`make lock`); `make setup` installs it with `--require-hashes`, and the
bundle's wheelhouse is resolved from it and each wheel checked against its hashes
(installer.toolchain.wheelhouse). llama-cpp-python is the one package the lock does not carry: the project
builds its portable wheel itself from the sdist whose hash installer.toolchain.llama_wheel pins, so `strip`
takes its entry out after checking that pip-compile saw that same sdist.

Standard library only (it runs before the project's venv exists).

    python -m installer.toolchain.lockfile strip requirements/lock.txt
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

LOCK = Path(__file__).resolve().parents[2] / "requirements" / "lock.txt"
BUILT_HERE = "llama-cpp-python"  # built by installer.toolchain.llama_wheel, never taken from the lock

_PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>\S+)")
_HASH = re.compile(r"--hash=sha256:([0-9a-f]{64})")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _blocks(text: str) -> list[tuple[str | None, list[str]]]:
    """The lock as (package name or None, its lines): a pin line, its hash lines and its comments."""
    out: list[tuple[str | None, list[str]]] = []
    for line in text.splitlines(keepends=True):
        m = _PIN.match(line)
        if m:
            out.append((normalize(m["name"]), [line]))
        elif out and out[-1][0] is not None and (line.startswith((" ", "\t"))):
            out[-1][1].append(line)
        else:
            out.append((None, [line]))
    return out


def pins(text: str) -> dict[str, tuple[str, frozenset[str]]]:
    """name -> (version, SHA-256 hashes) for every pinned package."""
    result: dict[str, tuple[str, frozenset[str]]] = {}
    for name, lines in _blocks(text):
        if name is None:
            continue
        m = _PIN.match(lines[0])
        assert m is not None
        result[name] = (m["version"], frozenset(_HASH.findall("".join(lines))))
    return result


def strip(text: str, name: str, sdist_sha256: str) -> str:
    """The lock without `name`'s entry, which must list exactly the sdist the project builds from."""
    key = normalize(name)
    found = pins(text).get(key)
    if found is not None and sdist_sha256 not in found[1]:
        raise ValueError(f"pip-compile locked {name} {found[0]} with hashes {sorted(found[1])}, not the sdist "
                         f"installer.toolchain.llama_wheel builds ({sdist_sha256}); bring the two to the same release.")
    kept = [line for n, lines in _blocks(text) if n != key for line in lines]
    note = f"# {name}: not locked here; installer.toolchain.llama_wheel builds its portable wheel from the sdist it pins.\n"
    body = "".join(kept)
    return body if note in body else body + note


def constraints(text: str) -> str:
    """The lock as a pip constraints file (pins only: pip takes no hashes in a constraints file)."""
    return "".join(f"{n}=={v}\n" for n, (v, _h) in sorted(pins(text).items()))


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "strip":
        print("usage: python -m installer.toolchain.lockfile strip LOCKFILE", file=sys.stderr)
        return 2
    from installer.toolchain.llama_wheel import SDIST_SHA256

    path = Path(argv[1])
    try:
        path.write_text(strip(path.read_text(), BUILT_HERE, SDIST_SHA256))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
