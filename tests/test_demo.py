"""The demo: its library logic on a tiny model, and the Gradio page in headless Chromium.

The browser test needs Chromium and the Playwright Python package (never ``playwright install``)::

    apt-get install -y chromium        # Debian; provides /usr/bin/chromium
    pip install playwright
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from conftest import make_byte_tokenizer, make_tiny_model

from steerplug import SparseAutoencoder, SteeredModel, SteeringConfig, SteeringVector
from steerplug.batching import BatchEngine
from steerplug.demo_utils import (FEATURE_COLUMNS, DemoSettings, chat_prompt_ids, compare_stream,
                                  feature_table, gate_log, load_steered, message_gate, score_figure,
                                  score_series, summary)
from steerplug.gate import PromptGate

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("STEERPLUG_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _sae_and_vector():
    sae = SparseAutoencoder.random(64, 256, hook_name="blocks.2.hook_resid_post")
    vector = SteeringVector.from_dense(torch.randn(256, generator=torch.Generator().manual_seed(1)), top_k=32)
    return sae, vector


@pytest.fixture(scope="module")
def engine():
    sae, vector = _sae_and_vector()
    steered = SteeredModel(make_tiny_model("llama"), make_byte_tokenizer(), sae, vector,
                           config=SteeringConfig(steps=3, lr=0.5))
    with BatchEngine(steered, max_batch=4) as eng:
        yield eng


@pytest.fixture(scope="module")
def gated_engine():
    """As ``engine``, with a random gate on the SAE's features (tests move its threshold)."""
    sae, vector = _sae_and_vector()
    gate = PromptGate(torch.randn(1, 256, generator=torch.Generator().manual_seed(2)), 0.1, 0.0, ("mean",))
    gate.metadata.hook_name = sae.cfg.hook_name
    steered = SteeredModel(make_tiny_model("llama"), make_byte_tokenizer(), sae, vector, gate=gate,
                           config=SteeringConfig(steps=3, lr=0.5))
    with BatchEngine(steered, max_batch=4) as eng:
        yield eng


def _app():
    sys.path.insert(0, str(REPO / "demo"))
    try:
        import app
    finally:
        sys.path.remove(str(REPO / "demo"))
    return app


def _respond(demo):
    fns = demo.fns.values() if isinstance(demo.fns, dict) else demo.fns
    return next(f.fn for f in fns if getattr(f.fn, "__name__", "") == "respond")


def _gate_logit(steered, ids: list[int]) -> float:
    """The gate's logit on a chat prompt by hand, from the model's hidden states."""
    with torch.no_grad():
        h = steered.model(torch.tensor([ids]), output_hidden_states=True).hidden_states[3]  # blocks.2
        f = steered.sae.encode(h[0]).unsqueeze(0)
        return float(steered.gate.score(f, torch.ones(1, len(ids), dtype=torch.bool))[0])


# --- library logic -------------------------------------------------------------------------------
def test_each_message_says_whether_the_gate_fired_with_its_score_and_threshold(gated_engine):
    """The gate line gives the real score and threshold, changes with the decision, and says what
    the steered column really does (steered when fired, the unsteered answer word for word if not)."""
    steered = gated_engine.steered
    message = "How do I make a cup of tea?"
    ids = chat_prompt_ids(gated_engine, [], message)
    score = _gate_logit(steered, ids)
    settings = DemoSettings(steps=3, strength=0.5, max_new_tokens=10)
    respond = _respond(_app().build_demo(gated_engine))
    lines = {}
    try:
        for threshold in (score - 0.3, score + 0.3):
            steered.gate.threshold = threshold
            line = message_gate(gated_engine, ids, settings).line()
            fired = score > threshold
            want = (f"gate: fired (score {score:.2f} > threshold {threshold:.2f}) → steered" if fired else
                    f"gate: did not fire (score {score:.2f} ≤ threshold {threshold:.2f}) → answer unchanged")
            assert line == want
            snap = list(compare_stream(gated_engine, ids, settings))[-1]
            assert (snap.steered.text != snap.plain.text) == fired, (line, snap.plain.text, snap.steered.text)
            lines[fired] = line
            # The page: the status line and the per-message gate log carry it.
            out = list(respond(message, [], [], True, 3, 0.5, "generated", 10))[-1]
            gates, log, status = out[-3], out[-2], out[-1]
            assert status.startswith(line + "\n\n") and "done" in status
            assert gates == [(message, line)] and log.endswith(f"1. “{message}”: {line}")
        assert lines[True] != lines[False]
        # A second message adds its own line; the first one's stays.
        out = list(respond("And with milk?", out[0], out[1], True, 3, 0.5, "generated", 4, out[-3]))[-1]
        assert [m for m, _ in out[-3]] == [message, "And with milk?"]
        assert re.search(r"2\. “And with milk\?”: gate: (fired|did not fire) \(score -?\d", out[-2])
    finally:
        steered.gate.threshold = 0.0


def test_the_gate_line_says_when_there_is_no_gate_or_it_is_off(engine, gated_engine):
    ids = chat_prompt_ids(engine, [], "How do I make a cup of tea?")
    assert message_gate(engine, ids, DemoSettings()).line().startswith("gate: none (this model has no gate")
    assert "not consulted (steering is off)" in message_gate(gated_engine, ids, DemoSettings(enabled=False)).line()
    assert "not consulted" in message_gate(gated_engine, ids, DemoSettings(steps=0)).line()
    steered = gated_engine.steered
    steered.config.use_gate = False
    try:
        line = message_gate(gated_engine, ids, DemoSettings()).line()
    finally:
        steered.config.use_gate = True
    assert line.startswith("gate: off (use_gate=False") and line.endswith("→ steered")
    assert gate_log([]) == "" and "\\*bold\\*" in gate_log([("*bold*", "gate: x")])


def test_compare_stream_streams_both_columns(engine):
    ids = chat_prompt_ids(engine, [], "How do I pick a lock?")
    snaps = []
    for snap in compare_stream(engine, ids, DemoSettings(steps=3, strength=0.5, max_new_tokens=12)):
        snaps.append((snap.plain.text, snap.steered.text, snap.done))
    final = snap
    assert snaps[-1][2] and not snaps[0][2]
    assert len(snaps) >= 24  # one snapshot per token per column, at least
    assert len(final.plain.traces) == len(final.steered.traces) == 12
    # Unsteered: the score is the same before and after; steered: steering lowered it.
    assert all(t.score_before == t.score_after for t in final.plain.traces)
    series = score_series(final)
    assert sum(series["steered answer, after steering"]) < sum(series["steered answer, before steering"])
    assert final.plain.text != final.steered.text
    # The plain column equals an unsteered run alone; the steered one the library's steered chat.
    with engine.steered.disabled():
        assert final.plain.text == engine.steered.chat("How do I pick a lock?", max_new_tokens=12)
    assert final.steered.text == engine.steered.chat("How do I pick a lock?", max_new_tokens=12,
                                                     steps=3, lr=0.5)
    off = list(compare_stream(engine, ids, DemoSettings(enabled=False, max_new_tokens=12)))[-1]
    assert off.plain.text == off.steered.text == final.plain.text


def test_compare_stream_with_diverged_histories(engine):
    a = chat_prompt_ids(engine, [], "first")
    b = chat_prompt_ids(engine, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
                        "first")
    snap = list(compare_stream(engine, a, DemoSettings(enabled=False, max_new_tokens=6),
                               steered_prompt_ids=b))[-1]
    with engine.steered.disabled():
        assert snap.plain.text == engine.steered.chat("first", max_new_tokens=6)
        assert snap.steered.text == engine.steered.chat(
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
             {"role": "user", "content": "first"}], max_new_tokens=6)


def test_figure_table_and_summary(engine):
    ids = chat_prompt_ids(engine, [], "hello")
    snap = list(compare_stream(engine, ids, DemoSettings(steps=2, strength=0.5, max_new_tokens=8)))[-1]
    fig = score_figure(snap)
    assert len(fig.axes[0].lines) == 3 + 1  # three series + the zero line
    rows = feature_table(snap, engine.steered.vector, k=5)
    assert 0 < len(rows) <= 5 and all(len(r) == len(FEATURE_COLUMNS) for r in rows)
    assert rows == sorted(rows, key=lambda r: -max(r[2], r[3]))
    support = dict(zip(*[t.tolist() for t in engine.steered.vector.support()]))
    assert all(r[1] == round(support.get(r[0], 0.0), 4) for r in rows)
    assert "8 tokens" in summary(snap)


def test_load_steered_placeholder_when_no_artifacts(tmp_path):
    folder = tmp_path / "model"
    make_tiny_model("llama").save_pretrained(folder)
    make_byte_tokenizer().save_pretrained(folder)
    steered, note = load_steered(str(folder), sae=None, vector=None)
    assert steered.can_steer and "random" in note
    assert steered.hook_point.name == "blocks.2.hook_resid_post"  # middle of 4 layers
    _, note = load_steered(str(folder), sae=None, vector=None, placeholder_if_missing=False)
    assert "off" in note


# --- the page in a browser -----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium not found at {CHROMIUM} (Debian: apt-get install -y chromium)")
    pytest.importorskip("playwright", reason="pip install playwright (no 'playwright install' needed)")
    root = tmp_path_factory.mktemp("demo")
    make_tiny_model("llama").save_pretrained(root / "model")
    make_byte_tokenizer().save_pretrained(root / "model")
    sae, vector = _sae_and_vector()
    sae.save_pretrained(root / "sae")
    vector.save_pretrained(root / "vector")
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    log = open(root / "demo.log", "w")
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "demo" / "app.py"), "--model", str(root / "model"),
         "--sae", str(root / "sae"), "--vector", str(root / "vector"), "--port", str(port),
         "--host", "127.0.0.1", "--max-new-tokens", "24", "--strength", "0.5"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("the demo did not start:\n" + (root / "demo.log").read_text()[-3000:])
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_demo_page_in_chromium(demo_url):
    from playwright.sync_api import sync_playwright

    def ask(page, prompt: str, clear: bool = True) -> tuple[str, str, str]:
        if clear:
            page.click("#clear")
            page.wait_for_function("!document.querySelector('#status').innerText.includes('done')")
        before = page.evaluate("document.querySelector('#status').innerText")
        page.fill("#prompt textarea", prompt)
        page.click("#send")
        page.wait_for_function("([prev]) => { const t = document.querySelector('#status').innerText;"
                               " return t.includes('done') && t !== prev; }", arg=[before],
                               timeout=120_000)
        return (*settled(page, turns=1 if clear else 2), page.inner_text("#status"))

    def settled(page, turns: int) -> tuple[str, str]:
        """The last answers, once both columns show ``turns`` of them and stop changing (the chatbot
        renders asynchronously, after the status line)."""
        page.wait_for_function(
            "([n]) => ['#plain-chat', '#steered-chat'].every("
            "c => document.querySelectorAll(c + ' [data-testid=bot]').length === n)", arg=[turns],
            timeout=30_000)
        read = ("['#plain-chat', '#steered-chat'].map(c => { const m = document.querySelectorAll("
                "c + ' [data-testid=bot]'); return m[m.length - 1].innerText; })")
        last, deadline = None, time.time() + 30
        while time.time() < deadline:
            now = page.evaluate(read)
            if now == last:
                return tuple(now)
            last = now
            time.sleep(0.5)
        raise AssertionError(f"the answers kept changing: {last!r}")

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(demo_url, wait_until="domcontentloaded")
            page.wait_for_selector("#prompt textarea", timeout=60_000)
            assert "steerplug" in page.title()
            assert page.locator("#note").count() == 0  # real (given) SAE: no placeholder note

            plain, steered, status = ask(page, "How do I pick a lock?")
            assert plain and steered and plain != steered
            assert "24 tokens" in status
            page.wait_for_selector("#score-plot img", timeout=30_000)  # rendered after the last update
            page.wait_for_selector("#features tbody tr", state="attached", timeout=30_000)

            page.fill("#strength input[type=number]", "1.5")
            page.press("#strength input[type=number]", "Enter")
            assert page.input_value("#strength input[type=number]") == "1.5"
            plain2, steered2, _ = ask(page, "How do I pick a lock?")
            assert plain2 == plain and steered2 != steered  # strength changes the steered answer only

            page.uncheck("#steer-on input")
            plain3, steered3, _ = ask(page, "How do I pick a lock?")
            assert steered3 == plain3 == plain  # steering off: both columns agree

            page.check("#steer-on input")
            ask(page, "And then?", clear=False)  # a second turn: both columns hold two answers
            assert page.locator("#plain-chat [data-testid=user]").count() == 2
            assert page.locator("#steered-chat [data-testid=user]").count() == 2
        finally:
            browser.close()


def test_demo_sliders_start_at_the_loaded_steering_configuration(engine):
    """A bundle's configuration (e.g. the shipped activation addition, one step of 0.3 at every
    position) is what the demo shows and sends unless the user moves a slider."""
    app = _app()

    def values(demo):
        return {b.elem_id: b.value for b in demo.blocks.values() if getattr(b, "elem_id", None)}

    v = values(app.build_demo(engine))
    assert (v["steps"], v["strength"], v["positions"]) == (3, 0.5, "generated")  # the engine's config
    v = values(app.build_demo(engine, steps=1, strength=0.3))
    assert (v["steps"], v["strength"]) == (1, 0.3)


def test_demo_refuses_an_overlong_message_before_any_work(engine):
    respond = _respond(_app().build_demo(engine, max_prompt_tokens=64))
    before = engine.stats["requests"]
    for message, needle in (("x" * 40_000, "40,000 characters"), ("hello " * 30, "tokens")):
        out = list(respond(message, [], [], True, 3, 0.5, "generated", 8))
        assert len(out) == 1 and needle in out[0][-1], out
        assert out[0][2] == message.strip()  # the text stays in the box: nothing is lost
    assert engine.stats["requests"] == before  # nothing was generated
    out = list(respond("hi", [], [], True, 3, 0.5, "generated", 4))
    assert engine.stats["requests"] == before + 2 and "done" in out[-1][-1]  # a short one is answered
