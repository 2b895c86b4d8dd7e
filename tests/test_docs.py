"""docs/operations.md, run: its ```sh blocks, in order, in one bash session against a temporary root.

The doc is written as an administrator types it; the test changes only what a test machine must:
- the media and the spec are the doc's own variables (STICK, KEYSTICK, DATA, SPEC), set in the
  environment to temporary directories and a small installable spec with the real SmolLM2 GGUF;
- VENDOR_FPR, which the delivery letter carries, is set right after the vendor's keygen block;
- `--no-systemd` is added to install/upgrade/rollback/uninstall (the doc says the flag exists), the
  API port 8088 becomes a free port, and `appliance train --now` gets `--max-steps 1`;
- blocks marked `<!-- doc-test: skip — reason -->` on the line before the fence are not run.

Cheap checks run too: every `appliance` command line in the doc (skipped blocks included) parses,
the 7B spec in the ```toml block is a valid tier table, and the metrics table names real metrics.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.install_fixtures import installable_spec
from tests.spec_files import write_spec
from tests.trainer_fixtures import DEMO_DATA

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "operations.md"
SKIP = re.compile(r"^<!--\s*doc-test:\s*skip\s*[—-]+\s*(?P<reason>\S.*?)\s*-->$")
MAX_SKIPPED = 5
LIFECYCLE = re.compile(r"\bappliance (install|upgrade|rollback|uninstall)\b")
MARK = "=== doc block"


@dataclass(frozen=True)
class Block:
    lang: str
    line: int  # 1-based line of the opening fence
    text: str
    skip: str | None  # the reason, when marked


def blocks(path: Path = DOC) -> list[Block]:
    lines = path.read_text().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = re.match(r"^```(\w+)\s*$", lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        assert j < len(lines), f"{path}:{i + 1}: the fence is never closed"
        prev = next((lines[k].strip() for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        skip = SKIP.match(prev)
        out.append(Block(m[1], i + 1, "\n".join(lines[i + 1:j]) + "\n", skip["reason"] if skip else None))
        i = j + 1
    return out


def command_lines(text: str) -> list[list[str]]:
    """The `appliance ...` commands of a block as argv lists (continuations joined, shell operators cut off)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if not line.startswith("appliance "):
            continue
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
        lex.whitespace_split = True
        argv: list[str] = []
        for tok in lex:
            if tok and set(tok) <= set(";&|<>"):
                break
            argv.append(tok)
        out.append(argv[1:])
    return out


# --- cheap checks -------------------------------------------------------------------------------


def test_blocks_are_marked_and_few_are_skipped() -> None:
    bs = blocks()
    sh = [b for b in bs if b.lang == "sh"]
    assert len(sh) >= 20, "the doc should show its commands in ```sh blocks"
    skipped = [b for b in sh if b.skip]
    assert len(skipped) <= MAX_SKIPPED, [f"line {b.line}: {b.skip}" for b in skipped]
    for b in skipped:
        assert len(b.skip or "") > 15, f"line {b.line}: say why the block cannot run here"
    text = DOC.read_text()
    assert text.count("doc-test:") == len(skipped), "a doc-test marker that is not right before a ```sh fence"


def test_every_documented_command_parses() -> None:
    from appliance.cli import build_parser

    seen = set()
    for b in blocks():
        if b.lang != "sh":
            continue
        for argv in command_lines(b.text):
            try:
                build_parser().parse_args(argv)
            except SystemExit:
                pytest.fail(f"docs/operations.md:{b.line}: `appliance {' '.join(argv)}` does not parse")
            seen.add(" ".join(argv[:2]) if argv[0] in ("bundle", "keys", "adapters", "audit") else argv[0])
    wanted = {"bundle keygen", "bundle build", "bundle verify", "bundle inspect", "hw", "install", "upgrade", "rollback",
              "uninstall", "status", "serve", "keys create", "keys list", "keys revoke", "train", "adapters list",
              "adapters promote", "adapters rollback", "support-bundle", "console", "audit verify"}
    assert wanted <= seen, f"verbs the doc never shows: {sorted(wanted - seen)}"


def test_the_7b_spec_is_a_valid_tier_table() -> None:
    from installer.bundle.manifest import BACKENDS
    from installer.hardware.machine import load_machine
    from installer.planning.planner import plan
    from installer.planning.tiers import parse_tiers

    toml = [b for b in blocks() if b.lang == "toml"]
    assert len(toml) == 1
    spec = tomllib.loads(toml[0].text)
    models = {m["id"]: (m["backend"], m["context_length"]) for m in spec["models"]}
    for m in spec["models"]:
        assert BACKENDS[m["backend"]] == m["format"], m["id"]
        assert m["files"], m["id"]
    tiers = parse_tiers(spec["tiers"], models)
    assert [t.name for t in tiers] == ["gpu", "gpu-q4", "cpu"]
    assert tiers[0].needs.gpu_memory_mib == 20 * 1024 and tiers[1].needs.gpu_memory_mib == 7 * 1024  # bundles/README.md's floors
    # The choices the doc quotes for recorded machines.
    machines = REPO / "tests" / "fixtures" / "machines"
    quoted = re.findall(r"`([\w-]+\.json)`(?: gets)?\s+`([\w-]+)`", DOC.read_text())
    assert len(quoted) >= 3, quoted
    for name, tier in quoted:
        chosen = plan(load_machine(machines / name), tiers).chosen
        assert chosen is not None and chosen.name == tier, f"{name}: the planner chooses {chosen and chosen.name}, the doc says {tier}"


def test_metrics_table_names_real_metrics() -> None:
    import json

    from appliance.server.metrics import Metrics
    from tests.fake_pynvml import FakeNvml

    m = Metrics()
    m.show_adapter(None)
    m.bind_gpus((0,), FakeNvml(json.loads((REPO / "tests/fixtures/machines/a100-40g.json").read_text())))  # NVML's stand-in
    m.requests.labels("/x", "200").inc()
    m.rejected.labels("rate_limited").inc()
    exported = {s.name for fam in m.registry.collect() for s in fam.samples}
    exported |= {fam.name for fam in m.registry.collect()}
    documented = set(re.findall(r"`(appliance_[a-z_]+)", DOC.read_text()))
    assert documented, "the metrics table is missing"
    assert documented <= exported, f"documented but not exported: {sorted(documented - exported)}"


def test_quoted_error_messages_are_the_codes() -> None:
    """The troubleshooting table quotes messages with `…` for the variable parts; every literal part is in the code."""
    source = "".join(p.read_text() for d in ("appliance", "installer") for p in (REPO / d).rglob("*.py"))
    section = DOC.read_text().split("When something goes wrong", 1)[1].split("\n## ", 1)[0]
    quoted = [m for m in re.findall(r"^\| `([^`]+)`", section, re.M)]
    assert len(quoted) >= 6
    for message in quoted:
        for part in message.split("…"):
            part = part.strip()
            if len(part) >= 6:
                assert part in source, f"the doc quotes {part!r}, which no error message says"


def test_console_screens_are_the_apps() -> None:
    from appliance.console.app import PAGES

    text = re.sub(r"\s+", " ", DOC.read_text())
    for key, page in enumerate(PAGES, 1):
        assert f"{key} {page.label}" in text, f"the console section does not list screen {key} {page.label}"


# --- the run ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def script(bs: list[Block], port: int) -> str:
    """One bash script: every runnable block, with a marker before each so a failure names its block."""
    parts = ["set -euo pipefail",
             'trap \'if [ -n "${SERVER_PID:-}" ]; then kill "$SERVER_PID" 2>/dev/null || true; fi\' EXIT']
    for n, b in enumerate(bs, 1):
        if b.lang != "sh" or b.skip:
            continue
        text = LIFECYCLE.sub(r"appliance \1 --no-systemd", b.text)
        text = text.replace(":8088", f":{port}").replace("appliance train --now", "appliance train --now --max-steps 1")
        parts.append(f"echo '{MARK} {n} (docs/operations.md:{b.line})'; echo '{MARK} {n}' >&2")
        parts.append(text)
        if "bundle keygen --out keys/" in text:  # the delivery letter arrives
            parts.append("VENDOR_FPR=$(python -c 'import sys; from installer.bundle.keys import fingerprint, load_public_key; "
                         "print(fingerprint(load_public_key(sys.argv[1])))' keys/signing.pub)")
    parts.append(f"echo '{MARK} end'")
    return "\n".join(parts) + "\n"


@pytest.mark.slow
def test_operations_doc_runs(tmp_path: Path, smollm2_gguf: Path, gguf_sha: str, trainer_base_dir: Path) -> None:
    work, root = tmp_path / "work", tmp_path / "root"
    media = {name: tmp_path / name for name in ("usb", "keystick", "data")}
    for d in (work, *media.values()):
        d.mkdir()
    spec = tmp_path / "site.toml"
    write_spec(spec, installable_spec(smollm2_gguf, "doc", name="site"))
    lines = (DEMO_DATA / "train.jsonl").read_text().splitlines()[:16]
    (media["data"] / "faq.jsonl").write_text("\n".join(lines) + "\n")
    # The trainer's cache of the dequantized base (made once per checkout by the trainer's own code):
    cache = root / "var/lib/appliance/trainer/base-cache"
    cache.mkdir(parents=True)
    (cache / gguf_sha).symlink_to(trainer_base_dir, target_is_directory=True)

    port = _free_port()
    (tmp_path / "doc.sh").write_text(script(blocks(), port))
    env = dict(os.environ, APPLIANCE_ROOT=str(root), STICK=str(media["usb"]), KEYSTICK=str(media["keystick"]),
               DATA=str(media["data"]), SPEC=str(spec), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("APPLIANCE_API_KEY", None)
    proc = subprocess.Popen(["bash", str(tmp_path / "doc.sh")], cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    (tmp_path / "doc.out").write_text(out + "\n--- stderr\n" + err)  # kept for reading after a failure
    if proc.returncode != 0:
        where = ([ln for ln in out.splitlines() if ln.startswith(MARK)] or ["before the first block"])[-1]
        pytest.fail(f"docs/operations.md failed at {where} (exit {proc.returncode}):\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-4000:]}")
    assert out.rstrip().endswith(f"{MARK} end")

    # What the doc promises, checked on the result.
    assert "verified site 1.0.0 sequence 1" in out and '"status":"ready"' in out
    assert "\n401\n" in out, "the revoked API key was still accepted"
    assert re.search(r'"adapter":"\d{8}T\d{6}Z-[0-9a-f]+"', out), "the server did not switch to the promoted adapter"
    assert re.search(r"^appliance_adapter_info\{adapter=", out, re.M), "the metrics block showed no adapter gauge"
    assert "rolled back to release 1.0.0+1" in out and "rolled back to release 1.0.0+2" in out
    assert "upgraded to site 1.0.0 (sequence 3)" in out
    assert "uninstalled and purged" in out
    trust = root / "etc/appliance/trust"
    assert not trust.exists(), "--purge left the pinned keys"
    support = list((work / "support").glob("appliance-support-*.tar.gz"))
    assert len(support) == 1
    assert not (root / "opt/appliance").exists()
