"""Does the engine answer on this host? Decode a real prompt in a child process and say how it ended.

An engine built for another CPU loads and imports fine, then dies by SIGILL at the first real batch
(prompt decoding runs other kernels than a single token). A signal cannot be caught inside the
process it kills, so the check runs a child: the installer runs it with the new release's venv
before anything is switched, and the server runs it before it loads the model itself. The child
prints one JSON line per stage (`cpu`, `variant`, then the result), so a death is reported with
the CPU and the llama.cpp variant it died on. The child is appliance/engines/selftest_decode.py;
this side imports no engine, so the installer can run it without torch or llama.cpp.
"""

from __future__ import annotations

import json
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.errors import EngineError

MIN_PROMPT_TOKENS = 8  # a batch: the AMX crash needed one, a single token decodes fine


@dataclass(frozen=True)
class SelfTest:
    cpu: str
    variant: str | None  # the llama.cpp CPU variant that ran (None: not llama.cpp, or a single-CPU build)
    prompt_tokens: int
    tokens: int
    text: str
    seconds: float

    def summary(self) -> str:
        on = f" with llama.cpp's {self.variant} CPU variant" if self.variant else ""
        return (f"decoded a {self.prompt_tokens}-token prompt and {self.tokens} tokens{on} on {self.cpu} "
                f"in {self.seconds:.1f} s: {self.text.strip()[:40]!r}")


def _signal_name(rc: int) -> str:
    try:
        return f"{signal.Signals(-rc).name} ({signal.strsignal(-rc) or 'signal'})"
    except ValueError:
        return f"signal {-rc}"


def run(python: str | Path, root: Path, model: dict[str, Any], timeout: float = 600) -> SelfTest:
    """Run the child with `python` (a release's venv, or this interpreter); an EngineError says what
    died, on which CPU, and what to do."""
    model = {k: v for k, v in model.items() if v is not None}  # an absent setting keeps its default
    cmd = [str(python), "-m", "appliance.engines.selftest_decode", "--root", str(root), "--model", json.dumps(model)]
    backend = model.get("backend", "llama.cpp")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise EngineError(f"The {backend} engine did not answer a test prompt within {timeout:.0f} s.",
                          "Check that the tier fits this machine (`appliance hw`); nothing was switched.") from None
    stages: dict[str, dict[str, Any]] = {}
    for line in proc.stdout.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "stage" in rec:
            stages[rec["stage"]] = rec
    cpu = stages.get("cpu", {}).get("cpu")
    if cpu is None:
        from appliance.cpu import this_cpu

        cpu = this_cpu().describe()
    variant = stages.get("variant", {}).get("variant")
    on = f"on this CPU, {cpu}" + (f", in llama.cpp's {variant} CPU variant" if variant else "")
    if proc.returncode < 0:
        raise EngineError(
            f"The {backend} engine died with {_signal_name(proc.returncode)} decoding a test prompt {on}.",
            "The bundle's engine was built for instructions this CPU lacks; ask the vendor for a bundle built with "
            "the portable llama.cpp runtime (every x86-64 CPU variant). Nothing was switched.")
    done = stages.get("done")
    if proc.returncode != 0 or done is None:
        lines = (proc.stderr or proc.stdout or "").strip().splitlines()
        raise EngineError(f"The {backend} engine failed a test prompt {on}: {lines[-1] if lines else f'exit code {proc.returncode}'}",
                          "See the message; `appliance hw` shows whether the tier fits this machine. Nothing was switched.")
    result = SelfTest(cpu, variant, int(done["prompt_tokens"]), int(done["tokens"]), str(done["text"]), float(done["seconds"]))
    if done.get("reason") == "error" or result.tokens == 0 or not result.text.strip() or result.prompt_tokens < MIN_PROMPT_TOKENS:
        raise EngineError(f"The {backend} engine gave a wrong-looking answer to a test prompt {on}: "
                          f"{result.tokens} tokens, {result.text!r}{', ' + str(done['error']) if done.get('error') else ''}.",
                          "The model file or the engine build is damaged; reinstall the bundle. Nothing was switched.")
    return result
