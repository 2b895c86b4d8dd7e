"""Before a release is switched in, its venv must load the tier's engine: a missing system library
(the llama.cpp wheel links libgomp.so.1) stops the install with the package to install."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from appliance.errors import HardwareError
from installer.system.release import check_engine_loads
from installer.system.runner import SubprocessRunner


@pytest.fixture(scope="module")
def bare_venv(tmp_path_factory):
    venv = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    return venv


def _site(venv):
    return next(venv.glob("lib/python3*/site-packages"))


def test_a_venv_without_the_engine_is_refused(bare_venv):
    with pytest.raises(HardwareError, match="llama.cpp engine cannot load.*No module named 'llama_cpp'") as e:
        check_engine_loads(SubprocessRunner(), bare_venv, "llama.cpp")
    assert "appliance hw --bundle" in e.value.hint


def test_a_missing_shared_library_names_it_in_the_hint(bare_venv):
    pkg = _site(bare_venv) / "llama_cpp"
    pkg.mkdir()
    # What the real package does at import: load its native library, which needs a system one.
    (pkg / "__init__.py").write_text("import ctypes\nctypes.CDLL('libappliance-absent.so.1')\n")
    try:
        with pytest.raises(HardwareError, match="libappliance-absent.so.1: cannot open shared object file") as e:
            check_engine_loads(SubprocessRunner(), bare_venv, "llama.cpp")
        assert "provides libappliance-absent.so.1" in e.value.hint and "nothing was switched" in e.value.hint
    finally:
        (pkg / "__init__.py").unlink()
        pkg.rmdir()


def test_the_project_venv_loads_both_engines():
    venv = Path(sys.prefix)
    for backend in ("llama.cpp", "transformers"):
        check_engine_loads(SubprocessRunner(), venv, backend)
