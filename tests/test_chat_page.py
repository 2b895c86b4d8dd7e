"""The staff chat page (/chat/) in a real browser: Debian's chromium, driven by Playwright.

The main case runs `appliance serve` as a process with SmolLM2 and asks the demo question as a
person would: a key typed in once, a streamed answer, 👍, a correction, and both in the feedback
store. A reply full of markup comes from the scripted model (tests/scripted_engine.py), so its text
is known to the character. Set APPLIANCE_CHAT_SCREENSHOT=docs/chat-page.png to write the README's
screenshot from the main case.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from appliance.cli.demo import QUESTION
from appliance.server import chat_page
from appliance.server.app import Settings, create_app
from tests import scripted_engine as scripted
from tests.server_fixtures import REPO, Root, free_port, install_adapter, live_server, make_root
from tests.server_fixtures import scripted_root as scripted_tree
from tests.waiting import wait_until

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed "
                                    "(`apt-get install chromium`; .ci/run installs it)")
STATIC = REPO / "appliance" / "server" / "chat_page"
HOSTILE = '<script>alert("from the model")</script><img src=x onerror="alert(2)"> <b>bold</b> &amp; done'
CORRECTION = "The Seine flows through Paris."
ADAPTER = "site-1"


# --- fixtures -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (`apt-get install chromium`; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM))
        yield b
        b.close()


class Watched:
    """A page with everything that should never happen recorded: dialogs, script errors, CSP reports."""

    def __init__(self, browser: Any) -> None:
        self.context = browser.new_context(viewport={"width": 960, "height": 720})
        self.page = self.context.new_page()
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", lambda m: self.errors.append(m.text) if "Content Security Policy" in m.text else None)

    def log_in(self, url: str, key: str) -> None:
        self.page.goto(url + "/")  # the server's root sends a person to the page
        assert self.page.url == url + chat_page.PATH
        self.page.fill("#key", key)
        self.page.click("#login button[type=submit]")

    def cap_answers(self, max_tokens: int) -> None:
        """Add max_tokens to the page's chat requests (it sends none: an answer may run to the end of the
        context). The random adapter's sampled answers ramble; one that filled the 2,048-token context
        left no room for the next question, which the page then refused, as it should."""

        def capped(route: Any) -> None:
            body = json.loads(route.request.post_data or "{}")
            route.continue_(post_data=json.dumps({**body, "max_tokens": max_tokens}))

        self.page.route("**/v1/chat/completions", capped)

    def ask(self, question: str) -> None:
        self.page.fill("#question", question)
        self.page.press("#question", "Enter")

    def answer(self, n: int, timeout_s: float) -> Any:
        """The n-th reply, once it is complete; a failure if the page shows an error there instead."""
        reply = self.page.locator(".message.assistant").nth(n)
        reply.locator(".meta, .error").first.wait_for(timeout=timeout_s * 1000)
        errors = reply.locator(".error")
        assert errors.count() == 0, errors.first.text_content()
        return reply

    def close(self) -> None:
        self.context.close()


@contextlib.contextmanager
def watched(browser: Any) -> Iterator[Watched]:
    w = Watched(browser)
    try:
        yield w
        assert w.dialogs == [] and w.errors == []
    finally:
        w.close()


@pytest.fixture(scope="module")
def scripted_root(tmp_path_factory: pytest.TempPathFactory) -> Root:
    return scripted_tree(tmp_path_factory.mktemp("chat-scripted"))


@pytest.fixture(scope="module")
def hostile_server(scripted_root: Root) -> Iterator[str]:
    """A live server whose model answers HOSTILE to every question."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scripted, "REPLY", HOSTILE)
        engine = scripted.scripted_engine(scripted_root.config)
        cfg = scripted_root.config
        with live_server(create_app(Settings(scripted_root.layout, cfg.server, cfg.model.id), engine)) as url:
            yield url


@pytest.fixture(scope="module")
def smollm2_server(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path, random_lora: Path) -> Iterator[tuple[str, Root]]:
    """`appliance serve` as the server unit runs it, on SmolLM2 with an active adapter (ADAPTER), on loopback."""
    tmp = tmp_path_factory.mktemp("chat-smollm2")
    root = make_root(tmp / "root", smollm2_gguf, context=2048)  # room for two questions and their answers
    install_adapter(root.layout, ADAPTER, random_lora)
    port = free_port()
    log_path = tmp / "serve.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve", "--root", str(root.layout.root), "--port", str(port)],
                                env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until(lambda: _ready(url) or proc.poll() is not None, "the server ready", timeout=300, every=0.2)
            assert proc.poll() is None, log_path.read_text()
            yield url, root
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health/ready", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


# --- in the browser ---------------------------------------------------------------------------------
@needs_chromium
def test_staff_member_asks_rates_and_corrects_the_real_model(browser, smollm2_server):
    url, root = smollm2_server
    with watched(browser) as w:
        page = w.page
        w.cap_answers(256)
        w.log_in(url, root.user_key)
        page.wait_for_selector("#chat:not([hidden])", timeout=30_000)
        # The key is in this tab's session storage only: not in the URL, not in a cookie.
        assert page.evaluate("sessionStorage.getItem('appliance.apiKey')") == root.user_key
        assert root.user_key not in page.url and page.evaluate("document.cookie") == ""
        # Every change to the first answer's text, as the page makes it (one per streamed piece).
        page.evaluate("""() => { window.seen = [];
            new MutationObserver(() => { const t = document.querySelector('.message.assistant .text');
                if (t) window.seen.push(t.textContent.length); })
            .observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true}); }""")
        w.ask(QUESTION)
        first = w.answer(0, timeout_s=240)
        answer = first.locator(".text").text_content() or ""
        lengths = [n for n in page.evaluate("window.seen") if n]
        assert answer.strip(), "no answer was shown"
        assert len(set(lengths)) >= 3 and lengths == sorted(lengths), f"the answer did not grow piece by piece: {lengths}"
        assert first.locator(".meta").text_content() == f"Answered by {root.config.model.id} with adapter {ADAPTER}"

        first.locator(".rate-up").click()
        first.locator(".rate-up.chosen").wait_for(timeout=30_000)
        assert first.locator(".status").text_content() == "Thank you: it goes to the nightly training."
        assert first.locator("button:enabled").count() == 0  # one rating an answer, as the server takes them

        w.ask("And which river flows through it?")  # the conversation goes on: the page sends what came before
        second = w.answer(1, timeout_s=240)
        second.locator(".correct").click()
        box = second.locator(".correction textarea")
        assert box.input_value() == second.locator(".text").text_content()  # starts from the answer given
        box.fill(CORRECTION)
        second.locator(".correction button[type=submit]").click()
        second.locator(".correct.chosen").wait_for(timeout=30_000)
        assert (second.locator(".status").text_content() or "").startswith("Thank you")
        assert second.locator(".sent-correction").text_content() == f"Your correction: {CORRECTION}"
        if shot := os.environ.get("APPLIANCE_CHAT_SCREENSHOT"):
            page.mouse.move(0, 0)
            page.screenshot(path=shot, full_page=True)

    db = sqlite3.connect(root.layout.data / "feedback.sqlite3")
    try:  # held for an admin or accepted (`[server] accept_corrections`): in the store either way
        rows = db.execute("SELECT f.rating, f.corrected, e.adapter, e.messages FROM feedback f "
                          "JOIN exchanges e ON e.request_id = f.request_id ORDER BY f.row").fetchall()
    finally:
        db.close()
    assert [(r[0], r[1], r[2]) for r in rows] == [(1, None, ADAPTER), (-1, CORRECTION, ADAPTER)]
    assert [[m["role"] for m in json.loads(r[3])] for r in rows] == [["user"], ["user", "assistant", "user"]]


@needs_chromium
def test_markup_in_an_answer_shows_as_text_and_never_runs(browser, hostile_server, scripted_root):
    with watched(browser) as w:
        page = w.page
        w.log_in(hostile_server, scripted_root.user_key)
        w.ask("Say something dangerous.")
        reply = w.answer(0, timeout_s=60)
        assert reply.locator(".text").text_content() == HOSTILE
        assert reply.locator(".text *").count() == 0  # not one element made from the model's text
        assert page.evaluate("[...document.scripts].map(s => s.getAttribute('src'))") == ["chat.js"]
        assert page.locator("img").count() == 0
        assert reply.locator(".meta").text_content() == f"Answered by {scripted_root.config.model.id} (base model, no adapter)"
    # watched() asserts no dialog opened and no script error or CSP report was seen


@needs_chromium
def test_a_wrong_key_is_refused_with_a_clear_message(browser, hostile_server):
    with watched(browser) as w:
        page = w.page
        w.log_in(hostile_server, "not-a-key")
        error = page.locator("#login-error")
        error.wait_for(timeout=30_000)
        assert error.text_content() == ("That key was not accepted: it is unknown or has been revoked. "
                                        "Ask your administrator for a key (appliance keys create --role user).")
        assert page.locator("#chat").is_hidden()
        assert page.evaluate("sessionStorage.getItem('appliance.apiKey')") is None


@needs_chromium
def test_a_conversation_too_long_for_the_model_says_to_start_a_new_one(browser, hostile_server, scripted_root):
    with watched(browser) as w:
        page = w.page
        w.log_in(hostile_server, scripted_root.user_key)
        w.ask("x" * (scripted_root.config.model.context_length + 1))  # one token a character
        error = page.locator(".message.assistant .error")
        error.wait_for(timeout=30_000)
        assert error.text_content() == ("This conversation is now longer than the model can read at once. "
                                        "Start a new conversation (the button at the top) and ask again.")
        page.click("#new-chat")
        assert page.locator("#messages > li").count() == 0
        w.ask("Hello?")  # what was too long is not sent again
        assert w.answer(0, timeout_s=60).locator(".text").text_content() == HOSTILE


# --- the page's responses and files ----------------------------------------------------------------
@pytest.fixture(scope="module")
def client(scripted_root: Root) -> Iterator[TestClient]:
    engine = scripted.scripted_engine(scripted_root.config)
    cfg = scripted_root.config
    with TestClient(create_app(Settings(scripted_root.layout, cfg.server, cfg.model.id), engine)) as c:
        yield c


@pytest.mark.parametrize("path, media", [("/chat/", "text/html"), ("/chat/chat.js", "text/javascript"),
                                         ("/chat/chat.css", "text/css")])
def test_the_page_is_served_without_a_key_under_a_strict_policy(client, path, media):
    r = client.get(path)
    assert r.status_code == 200 and r.headers["content-type"].startswith(media)
    policy = dict(d.strip().split(" ", 1) for d in r.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'" and policy["frame-ancestors"] == "'none'"
    for directive in ("script-src", "style-src", "connect-src"):
        assert policy[directive] == "'self'"  # no 'unsafe-inline', no 'unsafe-eval', no other host
    assert policy["form-action"] == "'none'" and policy["base-uri"] == "'none'"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.content == (STATIC / chat_page.FILES[path.removeprefix(chat_page.PATH)][0]).read_bytes()


def test_the_root_leads_to_the_page_and_the_api_still_needs_a_key(client):
    for path in ("/", "/chat"):
        r = client.get(path, follow_redirects=False)
        assert r.status_code == 302 and r.headers["location"] == chat_page.PATH
    assert client.get("/v1/models").status_code == 401
    assert not [p for p in client.app.openapi()["paths"] if p == "/" or p.startswith("/chat")]  # not part of the API


def test_no_external_address_and_no_html_from_strings_in_the_files():
    files = {p.name: p.read_text() for p in STATIC.iterdir()}
    assert set(files) == {"index.html", "chat.js", "chat.css"}
    for name, text in files.items():
        assert not re.search(r"https?:|//[a-z0-9.-]+\.[a-z]{2,}|\bwss?:", text, re.I), f"{name} names an address elsewhere"
        assert not re.search(r"@import|url\(", text), f"{name} loads a resource"
    js = files["chat.js"]
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "Function(", "DOMParser",
                 "createContextualFragment", "localStorage", "document.cookie", "location"):
        assert sink not in js, f"chat.js uses {sink}"
    html = files["index.html"]
    assert re.findall(r"<script\b[^>]*>(.*?)</script>", html, re.S) == [""]  # one script, from a file
    assert not re.search(r"<style|\sstyle=|\son[a-z]+=", html, re.I), "inline style or handler in index.html"


@pytest.mark.slow
def test_the_wheel_carries_the_page(tmp_path):
    from installer.toolchain.spec import Wheelhouse
    from installer.toolchain.wheelhouse import build_wheelhouse

    build_wheelhouse(Wheelhouse(project=REPO, extras=(), dependencies=False), tmp_path)
    (wheel,) = (tmp_path / "cpu").glob("appliance-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for url, (name, _) in chat_page.FILES.items():
            assert z.read(f"appliance/server/chat_page/{name}") == (STATIC / name).read_bytes(), url
    assert "appliance/server/chat_page.py" in names
