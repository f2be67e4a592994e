"""What each control-socket operation accepts: one msgspec schema per operation.

tm4d checks a request's arguments against its operation's schema before the operation
runs, so a wrong type (`"ttl": {"a": 1}`) is a ValidationError naming the argument,
never an AttributeError deep inside. The schemas check the JSON shape only; what a value
means (an address, a duration, a service) is still checked by the operation itself.
Keys a schema does not list are let through (and ignored by the operation); an
operation without a schema gets only the size and depth limits of tm4.ops.control.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec

from tm4.core.errors import ValidationError

Text = Annotated[str, msgspec.Meta(max_length=65536)]
Texts = Text | Annotated[list[Text], msgspec.Meta(max_length=4096)]
Ttl = Text | int | float | None  # "2h", or seconds; None: permanent
OptText = Text | None


class _Root(msgspec.Struct, kw_only=True):
    """What the CLI sends with every root operation."""

    actor: Text = ""
    force: bool = False
    origin: Text = "admin"
    ssh_clients: Annotated[list[Text], msgspec.Meta(max_length=256)] = []


class Allow(_Root, kw_only=True):
    name: Text
    sources: Texts = []
    services: Texts = []
    ttl: Ttl = None
    note: Text = ""
    replace: bool = False
    endpoints: Texts = []
    zone: OptText = None


class Named(_Root, kw_only=True):
    name: Text


class Block(_Root, kw_only=True):
    address: Text
    ttl: Ttl = None
    reason: Text = ""
    offences: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] | None = None


class Addressed(_Root, kw_only=True):
    address: Text


class Log(_Root, kw_only=True):
    limit: Annotated[int, msgspec.Meta(ge=1, le=10000)] = 50
    subject: OptText = None


class Quarantine(_Root, kw_only=True):
    scan: bool = True


class QuarantineDrop(_Root, kw_only=True):
    ids: Annotated[list[int], msgspec.Meta(max_length=100_000)] | None = None
    all: bool = False


class Verify(msgspec.Struct, kw_only=True):
    passcode: OptText = None
    callerid: OptText = None
    channel_type: OptText = None
    endpoint: OptText = None
    remote_addr: OptText = None


class CheckAddress(msgspec.Struct, kw_only=True):
    token: OptText = None
    address: Text


class Grant(msgspec.Struct, kw_only=True):
    token: OptText = None
    address: Text
    callerid: OptText = None


SCHEMAS: dict[str, type[msgspec.Struct]] = {
    "allow": Allow,
    "revoke": Named,
    "entry": Named,
    "block": Block,
    "unblock": Addressed,
    "log": Log,
    "quarantine": Quarantine,
    "quarantine_drop": QuarantineDrop,
    **{op: _Root for op in ("entries", "bans", "apply", "sweep", "safe_mode", "safe_mode_off", "disable",
                            "enable", "status", "ping", "reload", "drift_check")},
    "dialin.verify": Verify,
    "dialin.check_address": CheckAddress,
    "dialin.grant": Grant,
    "dialin.external_address": msgspec.Struct,
}

_WORDS = {"str": "a string", "int": "a whole number", "float": "a number", "bool": "true or false",
          "null": "null", "array": "a list", "object": "an object"}


_GOT = {**_WORDS, "bool": "a boolean"}


def _words(types: str) -> str:
    names = [t.strip() for t in types.split("|")]
    if "float" in names and "int" in names:
        names.remove("int")  # "a number" says both
    return " or ".join(_WORDS.get(t, t) for t in names)


def check_args(op: str, args: dict[str, Any]) -> None:
    """Raise ValidationError naming the argument when `args` do not fit `op`'s schema."""
    schema = SCHEMAS.get(op)
    if schema is None:
        return
    try:
        msgspec.convert(args, schema, strict=True)
    except msgspec.ValidationError as exc:
        raise ValidationError(f"{op}: {_explain(str(exc))}") from None


def _explain(message: str) -> str:
    """'Expected `str`, got `object` - at `$.ttl`' -> "argument 'ttl' must be a string, got an object"."""
    text, _, at = message.rpartition(" - at `")
    if not _:
        text, at = message, ""
    where = at.rstrip("`").removeprefix("$").lstrip(".")
    arg = f"argument '{where}'" if where else "the arguments"
    if m := re.fullmatch(r"Object missing required field `(\w+)`", text):
        return f"argument '{m.group(1)}' is missing"
    if m := re.fullmatch(r"Expected `([\w |]+)`, got `(\w+)`", text):
        return f"{arg} must be {_words(m.group(1))}, got {_GOT.get(m.group(2), m.group(2))}"
    if m := re.fullmatch(r"Expected `\w+` (>=|<=) (-?\d+)", text):
        return f"{arg} must be {'at least' if m.group(1) == '>=' else 'at most'} {m.group(2)}"
    if m := re.fullmatch(r"Expected `(\w+)` of length <= (\d+)", text):
        return f"{arg} is too long (at most {m.group(2)} {'characters' if m.group(1) == 'str' else 'items'})"
    return f"{arg}: {text}"
