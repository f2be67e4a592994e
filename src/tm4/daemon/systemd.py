"""tm4d under systemd: readiness notification (Type=notify) and logging for the journal."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys

from tm4.core.text import install_log_escaping


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) how we are; a no-op outside systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(state.encode(), path)


def setup_logging(verbose: bool = False) -> None:
    """To stderr; the journal stamps time and pid itself, a terminal gets them in each line."""
    journal = bool(os.environ.get("JOURNAL_STREAM"))
    fmt = "%(levelname)s %(name)s: %(message)s" if journal else \
        "%(asctime)s.%(msecs)03d tm4d[%(process)d] %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format=fmt,
                        datefmt="%Y-%m-%dT%H:%M:%S", stream=sys.stderr, force=True)
    install_log_escaping()  # a CR/LF in an AMI field or a DNS answer never forges a line
