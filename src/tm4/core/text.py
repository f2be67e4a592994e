"""Text from outside (AMI fields, DNS answers, admin notes, caller IDs) made safe to show.

A lone LF or CR inside an AMI value, copied into a ban reason, would otherwise print as a
second, realistic line in the journal, `tm4 bans` or `tm4 log`, and an escape sequence
would repaint the admin's terminal. Such text is stored as it came and escaped at the
edges where it is shown or logged, by `escape_control` alone.
"""

from __future__ import annotations

import logging
import re

# C0 and C1 controls, DEL, and the Unicode characters that break or reorder a line:
# NEL is in C1; LINE/PARAGRAPH SEPARATOR; the bidi embeddings, overrides and isolates.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match[str]) -> str:
    c = m.group()
    if c in _NAMED:
        return _NAMED[c]
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}"


def escape_control(text: str) -> str:
    """One line, nothing a terminal obeys: '\\n' -> '\\\\n', ESC -> '\\\\x1b', U+2028 -> '\\\\u2028'.
    Printable text (any script) is left as it is."""
    return _UNSAFE.sub(_escape, text)


class EscapedLogRecord(logging.LogRecord):
    """A log record whose message is one line however its arguments came (the traceback of
    an exception, formatted separately, stays as Python wrote it)."""

    def getMessage(self) -> str:  # noqa: N802 (logging's name)
        return escape_control(super().getMessage())


def install_log_escaping() -> None:
    """Every record this process logs from now on is escaped, whichever handler or
    format writes it (tm4d's, `tm4 guard`'s basicConfig, a test's caplog)."""
    logging.setLogRecordFactory(EscapedLogRecord)
