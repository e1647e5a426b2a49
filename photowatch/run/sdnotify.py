"""systemd's notification protocol (``sd_notify``), in a few lines and no dependency.

Under ``Type=notify`` systemd passes the path of a datagram socket in
``NOTIFY_SOCKET`` (``@name`` is a socket in the abstract namespace). The
daemon sends ``READY=1`` once it is ready, ``STATUS=...`` lines that
``systemctl status`` shows, ``WATCHDOG=1`` pings (at least every
``WATCHDOG_USEC`` microseconds, or systemd restarts the service),
``EXTEND_TIMEOUT_USEC=...`` during a long startup and ``STOPPING=1`` on the
way out. Outside systemd every call is a no-op that returns False.
"""

from __future__ import annotations

import os
import socket


def notify(*lines: str) -> bool:
    """Send ``KEY=value`` lines to systemd; True when sent, False outside systemd.

    Never raises and never blocks: a notification that cannot be sent at once
    (socket gone, or its queue full because nobody reads it) is dropped. A
    blocking send would freeze the caller, and with it signal handling.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or not lines:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto("\n".join(lines).encode(), address)
    except OSError:
        return False
    return True


def watchdog_interval_s() -> float | None:
    """The watchdog period asked for by systemd (``WatchdogSec=``), in seconds, or None.

    None when there is no watchdog, or when ``WATCHDOG_PID`` names another process.
    """
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None


def status_line(text: str) -> str:
    """A ``STATUS=`` line (one line: newlines would end the message's field)."""
    return "STATUS=" + " ".join(text.split())
