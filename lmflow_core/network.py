"""The Hugging Face hub from lmflow's side: is it wanted (``HF_HUB_OFFLINE``), can it be reached, and a block in
which ``datasets`` and ``huggingface_hub`` read only local files and their caches.

Without a probe, an unreachable hub costs about 25 s of the libraries' retries before their error; one short
connection attempt decides instead, so a command either goes online or reads its caches at once.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

#: How long the one connection attempt to the hub may take.
PROBE_SECONDS = 3.0
_PROXIES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def hub_offline_requested() -> bool:
    """Whether the user asked for no network (``HF_HUB_OFFLINE=1``, ``HF_DATASETS_OFFLINE=1`` or
    ``TRANSFORMERS_OFFLINE=1``)."""
    from huggingface_hub import constants

    datasets_offline = os.environ.get("HF_DATASETS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE) or datasets_offline


def hub_reachable() -> bool:
    """Whether one TCP connection to the hub's host (``HF_ENDPOINT``) succeeds within ``PROBE_SECONDS``.

    Behind a proxy the hub's host is not connected to directly, so the libraries are trusted to get there.
    """
    if any(os.environ.get(name) for name in _PROXIES):
        return True
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    if not host:
        return False
    result: list[bool] = []

    def probe() -> None:  # name resolution has no timeout of its own: a thread bounds it
        try:
            socket.create_connection((host, port), timeout=PROBE_SECONDS).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(PROBE_SECONDS + 0.5)
    return bool(result and result[0])


@contextmanager
def hub_offline(enabled: bool = True) -> Iterator[None]:
    """Inside the block, ``datasets`` and ``huggingface_hub`` read only local files and their caches (as with
    ``HF_HUB_OFFLINE=1``); ``enabled=False`` leaves them as they are."""
    if not enabled:
        yield
        return
    import datasets.config
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved
