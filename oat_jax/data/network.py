"""Whether download hosts answer at all, found out in seconds.

Without network, tensorflow-datasets' download manager retries for minutes
before it gives up. One TCP connection per host with a short timeout answers
the same question at once. The hosts are tried in parallel threads under one
overall deadline, because a name lookup ignores the connect timeout and can
hang on its own; a thread still stuck when the deadline passes is a daemon,
abandoned, and ends with its lookup.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from typing import Iterable
from urllib.parse import urlsplit

CONNECT_TIMEOUT_S = 5.0  # per connection attempt
DEADLINE_S = 10.0  # all hosts together, name lookups included
MAX_HOSTS = 4  # a dataset's downloads come from a few hosts; more add nothing but threads
_PORTS = {"http": 80, "https": 443, "ftp": 21}

Address = tuple[str, int]


def addresses_of(urls: Iterable[str]) -> list[Address]:
    """The distinct (host, port) pairs of ``urls``, in order, at most MAX_HOSTS; unknown schemes are skipped."""
    found: list[Address] = []
    for url in urls:
        try:
            parts = urlsplit(url)
            address = (parts.hostname, parts.port or _PORTS.get(parts.scheme))
        except ValueError:  # a malformed port
            continue
        if address[0] and address[1] and address not in found:
            found.append(address)
    return found[:MAX_HOSTS]


def unreachable(
    addresses: list[Address], timeout_s: float | None = None, deadline_s: float | None = None
) -> str | None:
    """None when one of ``addresses`` accepts a TCP connection in time, else why none did (one line).

    ``timeout_s`` and ``deadline_s`` default to CONNECT_TIMEOUT_S and DEADLINE_S, read at call time.
    """
    timeout_s = CONNECT_TIMEOUT_S if timeout_s is None else timeout_s
    deadline_s = DEADLINE_S if deadline_s is None else deadline_s
    results: queue.Queue[tuple[Address, str | None]] = queue.Queue()
    for address in addresses:
        threading.Thread(target=_connect, args=(address, timeout_s, results), daemon=True).start()
    deadline = time.monotonic() + deadline_s
    failures: dict[Address, str] = {}
    while len(failures) < len(addresses):
        try:
            address, error = results.get(timeout=max(deadline - time.monotonic(), 0))
        except queue.Empty:
            break
        if error is None:
            return None
        failures[address] = error
    return ", ".join(
        f"{host}:{port} ({failures.get((host, port), f'no answer within {deadline_s:g} s')})"
        for host, port in addresses
    ) or "no host to try"


def _connect(address: Address, timeout_s: float, results: queue.Queue) -> None:
    """Put (address, None) on ``results`` when a connection opens, else (address, the error)."""
    try:
        with socket.create_connection(address, timeout=timeout_s):
            pass
    except Exception as e:  # OSError (timeouts, refusals, failed lookups) and oddities such as UnicodeError
        results.put((address, getattr(e, "strerror", None) or str(e) or type(e).__name__))
        return
    results.put((address, None))
