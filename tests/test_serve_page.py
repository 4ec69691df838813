"""The chat page (lmforge/serve/static/chat.html) in headless Chromium against a live `lmforge serve` app: a reply
streams in, Stop keeps the partial reply and frees the engine's slot, errors show in the page.

    python -m pytest -q tests/test_serve_page.py

Needs Playwright (`pip install playwright`) and a system Chromium (Debian: `apt-get install chromium`); the browser
Playwright downloads itself is not used, so the test runs offline. Skipped when either is missing.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
import urllib.request

import pytest
import torch

sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium executable (Debian: apt-get install chromium)")

KEY, NAME = "page-test-key", "tiny"
# A tiny model on a CPU writes a whole reply in milliseconds; each engine step waits this long so the page
# gets its tokens one by one and Stop lands mid-reply.
STEP_SECONDS = 0.02

# Records (assistant text length, status) at every change of the page, to see the reply grow while it streams.
WATCH = """() => {
  window.seen = [];
  new MutationObserver(() => {
    const replies = document.querySelectorAll("#messages .msg.assistant");
    const last = replies[replies.length - 1];
    window.seen.push([last ? last.textContent.length : 0, document.querySelector("#status").textContent]);
  }).observe(document.body, {childList: true, characterData: true, subtree: true});
}"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The app on a free loopback port (uvicorn in a thread): a random tiny chat model that needs an API key."""
    import uvicorn

    from lmforge.chat.template import ChatFormat
    from lmforge.model import ModelConfig, Transformer
    from lmforge.run import shakespeare_files
    from lmforge.serve.api import Served, create_app
    from lmforge.serve.engine import Engine
    from lmforge.tokenizer import load_tokenizer
    from lmforge.tokenizer.train import train_tokenizer

    root = tmp_path_factory.mktemp("page")
    text = shakespeare_files()[0].read_text(encoding="utf-8")[:60_000]
    docs = [json.dumps({"text": text[i : i + 4000]}) for i in range(0, len(text), 4000)]
    (root / "docs.jsonl").write_text("\n".join(docs) + "\n")
    train_tokenizer([root / "docs.jsonl"], 512, root / "tok", heldout_fraction=0)
    tok, chat = load_tokenizer(root / "tok"), ChatFormat(root / "tok")
    chat.stop_ids = []  # a random model may end its turn at any token; here every reply runs to max_tokens
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.get_vocab_size(), n_layer=2, d_model=32, n_head=4, n_kv_head=2, max_seq_len=512)
    engine = Engine(Transformer(cfg).eval(), max_batch=4)
    served = Served(engine, tok, chat, NAME, api_key=KEY)
    app = create_app(served)
    record = engine.on_step  # the server's metrics hook, kept

    def paced(rows: int, seconds: float) -> None:
        time.sleep(STEP_SECONDS)
        record(rows, seconds)

    engine.on_step = paced
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", served
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    """A fresh page (its own localStorage) on the chat page; fails the test on any uncaught script error."""
    context = browser.new_context(viewport={"width": 1100, "height": 720})
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server[0])
    yield page
    context.close()
    assert not errors, errors


def connect(page, key: str = KEY) -> None:
    page.fill("#api-key", key)
    page.dispatch_event("#api-key", "change")
    expect(page.locator("#model")).to_have_text(NAME)


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=5) as r:
        return json.loads(r.read())


def test_reply_streams_in_and_the_whole_history_is_sent(page, server, tmp_path):
    connect(page)
    expect(page.locator("#status")).to_have_text("ready")
    page.fill("#system", "Be brief.")
    page.fill("#max-tokens", "24")
    sent = []
    page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
    page.evaluate(WATCH)
    page.fill("#input", "Hello <b>there</b>")
    page.click("#send")
    expect(page.locator("#status")).to_have_text("ready", timeout=10_000)
    replies = page.locator("#messages .msg.assistant")
    expect(replies).to_have_count(1)
    first = replies.first.text_content()
    assert first
    growing = sorted({n for n, status in page.evaluate("window.seen") if status == "streaming…" and n > 0})
    assert len(growing) >= 3, growing  # it arrived in pieces while the status said so, not all at once
    # User text is text, not markup.
    assert page.locator("#messages .msg.user").text_content() == "Hello <b>there</b>"
    assert page.locator("#messages b").count() == 0

    page.press("#input", "Shift+Enter")  # a newline, not a send
    assert page.input_value("#input") == "\n"
    page.fill("#input", "And then?")
    page.press("#input", "Enter")
    expect(replies).to_have_count(2)
    expect(page.locator("#status")).to_have_text("ready", timeout=10_000)
    assert len(sent) == 2
    assert sent[1]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello <b>there</b>"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And then?"},
    ]
    assert {k: sent[1][k] for k in ("model", "stream", "temperature", "top_p", "max_tokens")} == {
        "model": NAME, "stream": True, "temperature": 0.7, "top_p": 0.9, "max_tokens": 24}  # fmt: skip
    shot = tmp_path / "chat.png"
    page.screenshot(path=shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 1000

    page.click("#new-chat")
    expect(page.locator("#messages .msg")).to_have_count(0)


def test_stop_keeps_the_partial_reply_and_frees_the_slot(page, server):
    url, _ = server
    connect(page)
    page.reload()  # the key was kept in localStorage
    expect(page.locator("#model")).to_have_text(NAME)
    page.fill("#max-tokens", "400")  # 400 steps of STEP_SECONDS: 8 s if nothing stopped it
    page.fill("#input", "Tell me a long story.")
    page.click("#send")
    reply = page.locator("#messages .msg.assistant")
    page.wait_for_function("document.querySelector('#messages .msg.assistant').textContent.length >= 5")
    expect(page.locator("#status")).to_have_text("streaming…")
    assert health(url)["running"] == 1
    page.click("#stop")
    expect(page.locator("#status")).to_have_text("ready")
    partial = reply.text_content()
    assert partial and reply.get_attribute("data-finish") == "stopped"
    deadline = time.monotonic() + 5
    while health(url)["running"]:  # the closed stream cancelled the request: the engine freed its slot
        assert time.monotonic() < deadline, health(url)
        time.sleep(0.05)
    page.wait_for_timeout(200)
    assert reply.text_content() == partial  # nothing more arrived
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#stop")).to_be_disabled()


def test_errors_show_in_the_page(page, server):
    # No key: GET /v1/models answers 401, and the page says so.
    expect(page.locator("#error")).to_contain_text("401: invalid API key")
    expect(page.locator("#model")).to_have_text("(no model)")
    page.fill("#api-key", "wrong")
    page.dispatch_event("#api-key", "change")
    page.fill("#input", "Hello")
    page.click("#send")
    expect(page.locator("#error")).to_contain_text("401: invalid API key")
    expect(page.locator("#messages .msg")).to_have_count(0)

    # The right key clears it; a request the server refuses (400) shows its message, the turn is undone.
    connect(page)
    expect(page.locator("#error")).to_be_empty()
    page.fill("#max-tokens", "600")  # over the 512-token context
    page.click("#send")
    expect(page.locator("#error")).to_contain_text("exceeds this model's context of 512 tokens")
    expect(page.locator("#messages .msg")).to_have_count(0)
    assert page.input_value("#input") == "Hello"  # given back to edit
    expect(page.locator("#status")).to_have_text("ready")

    # No response at all (the connection fails).
    page.fill("#max-tokens", "16")
    page.route("**/v1/chat/completions", lambda route: route.abort())
    page.click("#send")
    expect(page.locator("#error")).to_contain_text("network error")
    page.unroute("**/v1/chat/completions")

    # An error event in the middle of a stream: the text so far stays, the error shows.
    events = ['{"choices": [{"index": 0, "delta": {"content": "Half a"}}]}', '{"error": {"message": "boom"}}']
    body = "".join(f"data: {e}\n\n" for e in events)
    page.route("**/v1/chat/completions", lambda route: route.fulfill(content_type="text/event-stream", body=body))
    page.click("#send")
    expect(page.locator("#error")).to_contain_text("the server failed mid-reply: boom")
    expect(page.locator("#messages .msg.assistant")).to_have_text("Half a")
    assert page.locator("#messages .msg.assistant").get_attribute("data-finish") == "error"

    # A stream that just ends, without [DONE]: said too, not taken for a whole reply.
    page.click("#new-chat")
    page.unroute("**/v1/chat/completions")
    body = f"data: {events[0]}\n\n"
    page.route("**/v1/chat/completions", lambda route: route.fulfill(content_type="text/event-stream", body=body))
    page.fill("#input", "Hello")
    page.click("#send")
    expect(page.locator("#error")).to_contain_text("closed the stream before the reply ended")
    expect(page.locator("#messages .msg.assistant")).to_have_text("Half a")


def test_event_parser_takes_any_chunk_boundaries(page):
    """Events split anywhere, even inside a UTF-8 character: one byte per network chunk."""
    got = page.evaluate("""async () => {
      const bytes = new TextEncoder().encode('data: {"a": "héllo 世界"}\\r\\n\\ndata: [DONE]\\n\\n');
      const body = new ReadableStream({start(c) { for (const b of bytes) c.enqueue(new Uint8Array([b])); c.close(); }});
      const got = [];
      await readEvents(body, (d) => got.push(d));
      return got;
    }""")
    assert got == ['{"a": "héllo 世界"}', "[DONE]"]
