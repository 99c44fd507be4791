"""Whether the Hugging Face hub can be reached, asked once per process before anything is fetched from it.

transformers, datasets and huggingface_hub retry a hub they cannot resolve: on a machine without a network a mistyped
model id took 50 s to fail (tests/models/test_hooks.py measured it). With one short connection attempt first, an
offline machine loads what the local cache holds and refuses the rest at once.
"""

from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

CONNECT_TIMEOUT_S = 3.0


@functools.cache
def hub_reachable() -> bool:
    """False when HF_HUB_OFFLINE is set, or when the hub's endpoint (HF_ENDPOINT, default huggingface.co) takes no
    connection within CONNECT_TIMEOUT_S."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "", port), timeout=CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False
