"""The control socket of a layer mount process: its protocol and its client.

One request per connection, one JSON line each way:

- ``{"op": "status"}``: the process's counters (``lazyfs.serve`` builds them);
- ``{"op": "peers", "controls": [PATH, ...]}``: the control sockets of the
  layers merged with this one in an overlay (the snapshotter says so when
  it hands out the overlay's mounts); it asks them for the files its
  programs will load next (``lazyfs.dependencies``);
- ``{"op": "want", "wants": {...}}``: such a request from a peer.

A client that sends nothing gets the status (what the first version of the
protocol did). The server (trio) is in ``lazyfs.serve``; this module is
plain sockets, for the snapshotter and the CLI.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

MAX_LINE = 256 << 10  # bytes of one request
MAX_PEERS = 128
OPS = ("status", "peers", "want")


class ControlError(Exception):
    """No answer, or a request the mount process refused."""


def ask(path: str | os.PathLike[str], request: dict[str, Any], *, timeout: float = 5.0) -> dict[str, Any]:
    """Send ``request`` to the control socket at ``path``; its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
            sock.sendall(json.dumps(request).encode() + b"\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        except OSError as exc:
            raise ControlError(f"no lazyfs mount answers at {path}: {exc}") from None
    try:
        answer = json.loads(data)
    except ValueError:
        raise ControlError(f"the mount at {path} answered {data[:200]!r}") from None
    if not isinstance(answer, dict):
        raise ControlError(f"the mount at {path} answered {answer!r}")
    if "error" in answer and request.get("op") != "status":
        raise ControlError(f"the mount at {path} refused {request.get('op')!r}: {answer['error']}")
    return answer


def parse_request(line: bytes) -> tuple[str, dict[str, Any]]:
    """``(op, request)`` of a request line; an empty one asks for the status.
    Raises ValueError with a message for the client."""
    if not line.strip():
        return "status", {}
    request = json.loads(line)
    if not isinstance(request, dict) or request.get("op") not in OPS:
        raise ValueError(f"a request is an object with an op of {', '.join(OPS)}")
    op = request["op"]
    if op == "peers":
        controls = request.get("controls")
        if not isinstance(controls, list) or len(controls) > MAX_PEERS or not all(
            isinstance(c, str) and c.startswith("/") for c in controls
        ):
            raise ValueError(f"peers: controls must be at most {MAX_PEERS} absolute paths")
    if op == "want" and not isinstance(request.get("wants"), dict):
        raise ValueError("want: wants must be an object")
    return op, request


__all__ = ["ControlError", "MAX_LINE", "ask", "parse_request"]
