"""One table of exit codes, unique; every domain error that escapes an API route is answered in the
OpenAI error shape with its own status, not as a 500 crash."""

from __future__ import annotations

import importlib
import pkgutil

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

import appliance
import installer
from appliance.errors import EXIT_CODES, ApplianceError, UsageError

SKIP = {"appliance.console.screenshot"}  # needs a running console


def _all_errors() -> dict[str, type[ApplianceError]]:
    for pkg in (appliance, installer):
        for mod in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if mod.name not in SKIP and not mod.name.endswith("__main__"):
                importlib.import_module(mod.name)
    found: dict[str, type[ApplianceError]] = {}
    todo = [ApplianceError]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return found


def test_every_error_has_its_own_exit_code():
    errors = _all_errors()
    assert set(errors) == set(EXIT_CODES), (set(errors) ^ set(EXIT_CODES))
    codes = [cls.exit_code for cls in errors.values()]
    assert len(codes) == len(set(codes)), sorted(codes)
    assert all(0 < c < 126 for c in codes)  # 126+ mean "not executable", "not found" and signals to a shell


def test_a_new_error_without_a_code_fails_at_once():
    with pytest.raises(TypeError, match="no exit code in appliance.errors.EXIT_CODES"):
        type("ForgottenError", (ApplianceError,), {})


def test_a_domain_error_escaping_a_route_gets_its_status_in_the_openai_shape():
    from appliance.adapters import AdapterError
    from appliance.engines.scheduler import QueueFull
    from appliance.server.app import _install_error_handlers

    app = FastAPI()
    _install_error_handlers(app)
    raising = {"usage": UsageError("The field x is wrong.", "Send y."), "adapter": AdapterError("No adapter 7."),
               "busy": QueueFull("Too many waiting.")}

    @app.get("/{what}")
    async def boom(what: str) -> None:
        raise raising[what]

    client = TestClient(app, raise_server_exceptions=False)
    for what, status, type_ in (("usage", 400, "invalid_request_error"), ("adapter", 500, "server_error"),
                                ("busy", 429, "rate_limit_error")):
        r = client.get(f"/{what}")
        assert r.status_code == status, (what, r.text)
        err = r.json()["error"]
        assert err["type"] == type_ and err["message"].startswith(raising[what].message)
    assert client.get("/usage").json()["error"]["message"] == "The field x is wrong. Send y."


def test_the_console_and_the_command_line_say_the_same_sentence_and_hint():
    from appliance.cli import render_error
    from appliance.console.widgets.errors import error_line, error_parts, error_text

    e = UsageError("The bundle is not there\x1b[2J.", "Insert the stick.")
    assert error_parts(e) == ("The bundle is not there\\x1b[2J.", "Insert the stick.")  # no escape reaches the terminal
    assert render_error(e) == "error: The bundle is not there\x1b[2J.\nhint: Insert the stick."
    assert error_text(e, "Install failed: ").plain == "Install failed: The bundle is not there\\x1b[2J.\nInsert the stick."
    assert error_line(ValueError("boom")) == "ValueError: boom"
