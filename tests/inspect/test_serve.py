"""`saescope serve` end to end: a real server on 127.0.0.1 driven by headless Chromium, and bad requests that
get 4xx answers while the server keeps serving."""

from __future__ import annotations

import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import ARTIFACTS
from saescope.api.scope import Scope
from saescope.api.store import FeatureStore
from saescope.apps.inspect.serve import create_app
from saescope.core.io import load_saes
from saescope.core.models import load_model
from serve_requests import BAD_REQUESTS


@pytest.fixture(scope="module")
def server(tiny_qwen3, tiny_sae_dir, corpus_file):
    import uvicorn

    from saescope.api.store import StoreConfig, build_feature_store

    scope = Scope(load_model(str(tiny_qwen3)), load_saes(tiny_sae_dir))
    store_dir = tiny_sae_dir / "serve-store"
    build_feature_store(scope.lm, {1: scope.saes[1]}, store_dir, StoreConfig(max_tokens=1024, ctx_len=32, batch_size=4,
                        data=str(corpus_file)), sae_spec=str(tiny_sae_dir), overwrite=True, progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(scope, FeatureStore(store_dir)), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            httpx.get(url + "/api/info", timeout=1)
            break
        except httpx.TransportError:
            time.sleep(0.1)
    yield url, scope
    srv.should_exit = True
    thread.join(timeout=10)


def test_page_shows_features_cards_and_a_steered_generation(page, server):
    url, scope = server
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']")
    assert "layers 0, 1, 2" in page.inner_text("#info")
    page.select_option("#layer", "1")
    text = "Natalia sold clips to 48 of her friends in April"
    page.fill("#text", text)
    page.click("#encode")
    page.wait_for_selector("#top-table")
    codes = scope.encode([text], layers=[1])[0]
    assert page.locator(".tok").all_inner_texts() == codes.tokens
    # the table's best feature is the max over tokens 1.. of the codes
    dense = codes.layers[1].dense(64)[1:]
    first = page.locator("#top-table .feat").first
    assert int(first.inner_text()) == int(dense.amax(0).argmax())
    first.click()
    page.wait_for_selector("#card-title")
    assert page.inner_text("#card-title") == f"Layer 1 feature {int(dense.amax(0).argmax())}"
    assert "fires on" in page.inner_text("#card")  # layer 1 has a store: statistics and contexts
    page.locator(".tok").nth(3).click()
    assert "Token 3" in page.inner_text("#token-features")
    # a layer without a store: the logit lens only
    page.select_option("#layer", "2")
    page.click("#encode")
    page.wait_for_selector("#top-table")
    page.locator("#top-table .feat").first.click()
    page.wait_for_function("document.getElementById('card').innerText.includes('logit lens only')")
    # steering
    page.fill("#prompt", "Janet has ducks")
    page.select_option("#steer-layer", "1")
    page.fill("#steer-features", "2:300, 5:-300")
    page.fill("#max-new", "6")
    page.click("#steer")
    page.wait_for_selector("#steer-out:not([hidden])")
    unsteered, steered = page.inner_text("#unsteered"), page.inner_text("#steered")
    assert unsteered != steered
    # a bad request shows its error on the page and the page keeps working
    page.fill("#steer-features", "999:3")
    page.click("#steer")
    page.wait_for_function("document.getElementById('error').innerText.length > 0")
    assert "feature 999 does not exist" in page.inner_text("#error")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "serve.png"), full_page=True)


def _send(url: str, method: str, path: str, body) -> httpx.Response:
    if method == "GET":
        return httpx.get(url + path, timeout=60)
    if isinstance(body, bytes):
        return httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=60)
    return httpx.post(url + path, json=body, timeout=60)


def test_bad_requests_get_4xx_and_the_server_lives_on(server, caplog):
    url, _ = server
    with caplog.at_level(logging.WARNING):
        for method, path, body, status, fragment in BAD_REQUESTS:
            response = _send(url, method, path, body)
            assert response.status_code == status, (path, body if not isinstance(body, bytes) else body[:40], response.text)
            assert fragment in response.json()["error"] and "\n" not in response.json()["error"]
    ok = httpx.get(url + "/api/feature/1/3")
    assert ok.status_code == 200 and ok.json()["source"] == "store" and ok.json()["feature"] == 3
    assert httpx.get(url + "/api/info").status_code == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text


def test_concurrent_valid_and_invalid_requests_are_all_answered(server, caplog):
    """A bounded load on 127.0.0.1: 4 rounds of every bad request above and 3 valid ones, 16 at a time. Every request is
    answered with its own status, none with a 500, the log holds no traceback, and memory does not run away."""
    url, _ = server
    valid = [("POST", "/api/encode", {"text": "Janet has three ducks."}, 200, None), ("GET", "/api/feature/1/5", None, 200, None),
             ("POST", "/api/steer", {"prompt": "hi", "layer": 1, "features": {"2": 4}, "max_new_tokens": 2}, 200, None)]
    cases = [c for c in BAD_REQUESTS + valid for _ in range(4) if not (isinstance(c[2], bytes) and len(c[2]) > 1_000_000)]
    rss = lambda: int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmRSS")).split()[1]) // 1024  # noqa: E731
    before = rss()
    with caplog.at_level(logging.WARNING), ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda c: _send(url, *c[:3]).status_code, cases))
    assert got == [c[3] for c in cases]
    assert rss() - before < 300, f"resident memory grew by {rss() - before} MB under load"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text
