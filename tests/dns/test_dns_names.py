"""DNS names are validated before they are stored (RFC 1123 host names)."""

from __future__ import annotations

import pytest

from tm4.core.errors import ValidationError
from tm4.core.model import Source


@pytest.mark.parametrize("text,name", [
    ("office.example.com", "office.example.com"),
    ("Office.EXAMPLE.com.", "office.example.com"),  # case and the root dot do not matter
    ("a-b.c-d.example.net", "a-b.c-d.example.net"),
    ("xn--bcher-kva.example.test", "xn--bcher-kva.example.test"),  # IDN in punycode
    ("1host.example.com", "1host.example.com"),  # RFC 1123 allows a leading digit
    ("x" * 63 + ".example.com", "x" * 63 + ".example.com"),
    (".".join(["a" * 61] * 4), ".".join(["a" * 61] * 4)),  # 247 characters
])
def test_valid_names(text: str, name: str) -> None:
    src = Source.parse(text)
    assert src.is_dns and src.fqdn == name and src.network is None


@pytest.mark.parametrize("text", [
    "*.example.com",  # wildcard
    "localhost",  # not fully qualified
    "-office.example.com", "office-.example.com",  # hyphen at a label's edge
    "off_ice.example.com", "off ice.example.com", "office..example.com",
    "x" * 64 + ".example.com",  # label longer than 63
    ".".join(["a" * 63] * 4) + ".com",  # name longer than 253
    "host.example.123",  # numeric top-level label
    "bücher.example.com",  # not punycode
])
def test_invalid_names_are_refused(text: str) -> None:
    with pytest.raises(ValidationError):
        Source.parse(text)
