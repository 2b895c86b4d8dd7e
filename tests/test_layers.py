"""The layers hold at run time, and the house stays readable.

import-linter (`make lint`) checks the imports as written; these tests run each entry point in a
fresh interpreter, far enough to do its first real work, and look at `sys.modules`: an import
made late, inside a function, shows up here too.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.bundle_fixtures import REPO

ML = ("torch", "transformers", "peft")
UI = ("textual", "appliance.console")

# (what to run, modules that must not be loaded afterwards)
ENTRY_POINTS = {
    "the command line builds every verb": (
        "from appliance.cli import build_parser\nbuild_parser()",
        (*ML, *UI, "fastapi", "llama_cpp", "uvicorn", "installer.toolchain")),
    "the site's installer, its steps and the engine self-test's parent side": (
        "import installer.steps.install, installer.steps.lifecycle, installer.steps.prepare\n"
        "import appliance.engines.selftest",
        (*ML, *UI, "fastapi", "llama_cpp", "installer.toolchain", "appliance.cli")),
    "the vendor's bundle build, short of converting a model": (
        "import installer.toolchain.build, installer.bundle.reader, installer.bundle.trust",
        (*ML, *UI, "appliance.cli")),
    "the API server's app, built": (
        "from appliance.server.app import create_app\nfrom appliance.server.serving import Serving",
        (*UI, "installer", "appliance.cli", "appliance.trainer")),
    "the nightly trainer's pipeline": (
        "import appliance.trainer.run",
        (*UI, "installer", "appliance.cli", "fastapi", "appliance.server")),
    "the console app": (
        "import appliance.console.app",
        (*ML, "fastapi", "llama_cpp", "installer.toolchain", "appliance.server")),
}


def _loaded_after(code: str) -> set[str]:
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.splitlines()[-1]))


@pytest.mark.parametrize("what", ENTRY_POINTS)
def test_an_entry_point_loads_only_its_own_layer(what: str) -> None:
    code, forbidden = ENTRY_POINTS[what]
    loaded = _loaded_after(code)
    bad = sorted(m for m in loaded if any(m == f or m.startswith(f + ".") for f in forbidden))
    assert not bad, f"{what} loaded {bad}"


def test_the_probe_sees_an_import_made_inside_a_function() -> None:
    """The check above can fail: torch imported late, by the first call that needs it, is caught."""
    code = "import appliance.engines.replicas as r\nfrom appliance.config import ModelConfig\ntry:\n    r.require_cuda(ModelConfig(path='/m'))\nexcept Exception:\n    pass"
    assert "torch" not in _loaded_after("import appliance.engines") and "torch" in _loaded_after(code)


MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _sources() -> list[Path]:
    return sorted(p for d in ("appliance", "installer", "bench") for p in (REPO / d).rglob("*.py"))


def test_no_module_over_400_lines_and_no_function_over_60() -> None:
    sources, too_long = _sources(), []
    assert len(sources) > 50  # the glob found the tree
    for path in sources:
        text = path.read_text()
        name = path.relative_to(REPO)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None:
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}:{node.lineno} {node.name}(): {lines} lines")
    assert not too_long, "split these:\n" + "\n".join(too_long)


def test_the_readme_tree_names_every_package_and_module_group() -> None:
    """README.md's "The code" is the overview a newcomer reads first: it must not fall behind the tree."""
    readme = (REPO / "README.md").read_text()
    tree = readme[readme.index("## The code"):readme.index("## Where things live")]
    packages = sorted(str(p.parent.relative_to(REPO)) + "/" for d in ("appliance", "installer")
                      for p in (REPO / d).glob("*/__init__.py"))
    missing = [p for p in packages if p not in tree]
    assert len(packages) >= 10 and not missing, f"README.md's tree does not name {missing}"


def test_the_settings_reference_is_the_code_s_own():
    """docs/settings.md is written from the dataclasses that define each setting (`make docs`)."""
    from appliance.settings_reference import markdown

    doc = (REPO / "docs" / "settings.md").read_text()
    assert "| `max_queue` | `64` | at least 0 |" in doc and "| `cuda_visible_devices` |" in doc
    assert doc == markdown(), "docs/settings.md is behind the code: run `make docs`"
