"""core/hub.py: one short connection attempt says whether the hub can be reached; offline, hub ids fail at once."""

import socket
import time

import pytest

from saescope.core import hub
from saescope.core.errors import SaescopeError


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    hub.hub_reachable.cache_clear()
    yield
    hub.hub_reachable.cache_clear()


def test_an_endpoint_that_accepts_is_reachable_and_one_that_refuses_is_not(monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub.hub_reachable()
        port = server.getsockname()[1]
    hub.hub_reachable.cache_clear()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")  # closed now: refused
    assert not hub.hub_reachable()


def test_offline_mode_is_unreachable_without_asking(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: pytest.fail("offline mode must not connect"))
    assert not hub.hub_reachable()


def test_hub_ids_fail_at_once_when_the_hub_cannot_be_reached(monkeypatch, tmp_path):
    from saescope.core.data.sources import iter_texts
    from saescope.core.io import load_saes
    from saescope.core.models.load import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    start = time.perf_counter()
    with pytest.raises(SaescopeError, match="cannot load model 'no-such-org/no-such-model': not in the local Hugging Face cache"):
        load_model("no-such-org/no-such-model")
    with pytest.raises(SaescopeError, match="cannot open Hugging Face dataset 'someorg/somedataset': the hub cannot be reached"):
        list(iter_texts("someorg/somedataset"))
    with pytest.raises(SaescopeError, match="cannot fetch SAEs from hub repo"):
        load_saes("someorg/some-saes")
    assert time.perf_counter() - start < 15
