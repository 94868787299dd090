"""Turning an unexpected HTTP status into the right typed error."""

from __future__ import annotations

import json
from typing import NoReturn, Optional

from .errors import AuthError, NotFound, RegistryError, Unreachable
from .retry import RETRY_STATUSES
from .wire import WIRE_ERRORS, HttpResponse


def error_detail(resp: HttpResponse) -> str:
    """The registry's error codes and messages from its JSON error body."""
    if resp.method == "HEAD":
        return ""
    try:
        raw = resp.read(64 << 10)
        errors = json.loads(raw or b"{}").get("errors") or []
        return "; ".join(f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors)[:300]
    except (ValueError, AttributeError, TypeError, *WIRE_ERRORS):
        return ""


def fail(resp: HttpResponse, host: str, repo: Optional[str], target: Optional[str], what: str) -> NoReturn:
    """Raise the typed error for an unexpected status (closing the response)."""
    status = resp.status_code
    detail = error_detail(resp)
    resp.close()
    message = f"{what}: {detail}" if detail else what
    kind: type[RegistryError] = RegistryError
    if status in (401, 403):
        kind = AuthError
        hint = (
            "credentials rejected"
            if resp.sent_credentials
            else "no credentials for this host, or anonymous access refused"
        )
        message += f" ({'denied' if status == 403 else 'unauthorized'}: {hint})"
    elif status == 404:
        kind = NotFound
    elif status in RETRY_STATUSES:
        kind = Unreachable
        if resp.retry_gave_up:
            message += f" (still failing {resp.retry_gave_up})"
    raise kind(message, host=host, repo=repo, target=target, status=status)
