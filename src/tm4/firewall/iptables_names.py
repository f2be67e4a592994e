"""The names tm4 gives its iptables chains and ipsets, within the kernel's length limits.

tm4 owns the filter-table chain `TM4-INPUT` (and helper chains `TM4-*`) in both
families, and every ipset named `tm4-*`; a full apply builds sets under
temporary names `tm4~SUFFIX~NAME` first. A name too long for the kernel keeps a
readable head and ends in a digest of the whole. Pure.
"""

from __future__ import annotations

import hashlib

CHAIN = "TM4-INPUT"
CHAIN_PREFIX = "TM4-"
SET_PREFIX = "tm4-"
TEMP_PREFIX = "tm4~"


def digest(text: str, n: int) -> str:
    """The first `n` hex digits of `text`'s SHA-1: a short, stable stand-in for it."""
    return hashlib.sha1(text.encode()).hexdigest()[:n]


def ipset_name(name: str) -> str:
    """tm4's set `name` as an ipset name (ipset allows 31 characters)."""
    full = SET_PREFIX + name
    return full if len(full) <= 31 else f"{SET_PREFIX}{name[:16]}~{digest(name, 10)}"


def temp_name(name: str, suffix: str) -> str:
    """The temporary ipset name set `name` is built under during the apply `suffix`."""
    full = f"{TEMP_PREFIX}{suffix}~{name}"
    return full if len(full) <= 31 else f"{TEMP_PREFIX}{suffix}~{digest(name, 10)}"


def chain_name(name: str) -> str:
    """An nft chain of tm4's as an iptables chain (28 characters at most)."""
    if name == "input":
        return CHAIN
    full = CHAIN_PREFIX + name
    if len(full) > 24:  # room for helper chains' "-NN"
        full = f"{CHAIN_PREFIX}{name[:11]}~{digest(name, 8)}"
    return full
