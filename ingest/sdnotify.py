"""systemd's sd_notify protocol: datagrams of `KEY=VALUE` lines to $NOTIFY_SOCKET.

No libsystemd dependency: the protocol is one datagram per call. Outside systemd
(NOTIFY_SOCKET unset) every call is a no-op, so the appliance runs the same by hand.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._address: str | None = None
        self._socket: socket.socket | None = None
        if address:
            # A leading '@' names a socket in the abstract namespace.
            self._address = "\0" + address[1:] if address.startswith("@") else address
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def notify(self, **fields: str | int) -> None:
        if self._socket is None:
            return
        message = "\n".join(f"{key.upper()}={value}" for key, value in fields.items())
        try:
            self._socket.sendto(message.encode(), self._address)
        except OSError:
            # systemd gone (shutdown) or socket full: the next notification will try again.
            pass

    def ready(self, status: str) -> None:
        self.notify(ready=1, status=status, mainpid=os.getpid())

    def status(self, status: str) -> None:
        self.notify(status=status)

    def stopping(self) -> None:
        self.notify(stopping=1, status="draining")

    def watchdog(self) -> None:
        self.notify(watchdog=1)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def watchdog_interval_ms() -> int | None:
    """Half of systemd's WatchdogSec (as systemd recommends), or None when not watched."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return max(1, int(usec) // 2000)
