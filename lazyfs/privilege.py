"""Whether this process is the host's root, or only root of a user namespace.

Under RootlessKit or ``unshare -Ur`` the user is uid 0 but can write none of
root's directories (``/var/lib``, ``/run``, ``/etc``): default paths must
follow the unprivileged (XDG) conventions there, as if uid 0 were not.
"""

from __future__ import annotations

import os

_FULL_MAP = ["0", "0", "4294967295"]  # the initial user namespace's identity map


def is_host_root() -> bool:
    """uid 0 in the host's (initial) user namespace."""
    if os.geteuid() != 0:
        return False
    try:
        with open("/proc/self/uid_map", encoding="ascii") as f:
            return f.read().split() == _FULL_MAP
    except OSError:
        return True  # no /proc: assume a plain system
