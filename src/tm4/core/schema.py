"""Reading a TOML document against the config dataclasses (msgspec), one key at a time,
so that every refusal is one line naming the key: `[guard] failures: must be at least 1,
got 0`. The dataclasses themselves and the rules that span keys are in tm4.core.config;
the shapes of single values in tm4.core.values.
"""

from __future__ import annotations

import re
import typing
from dataclasses import fields, is_dataclass
from functools import cache
from typing import Annotated, Any, Literal

import msgspec

from tm4.core.text import escape_control
from tm4.core.values import dec_hook, shown


class Bad(Exception):
    """One key's problem, before the file's name is put in front."""

    def __init__(self, where: str, problem: str):
        # keys and section names come from the file: a control character in one must not
        # split or overwrite the admin's one line
        super().__init__(escape_control(f"{where}: {problem}" if where else problem))



_WORDS = {"int": "a whole number", "str": "a string", "bool": "true or false", "array": "a list",
          "object": "a table", "float": "a number", "null": "a value", "datetime": "a string",
          "date": "a string", "time": "a string"}


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _strip(tp: Any) -> Any:
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _type_at(tp: Any, path: list[str | int]) -> Any:
    for step in path:
        tp = _strip(tp)
        if isinstance(tp, type) and is_dataclass(tp):
            tp = _hints(tp).get(str(step))
        elif typing.get_origin(tp) in (list, dict):
            tp = typing.get_args(tp)[-1]
        else:
            return None
    return tp


def _bounds(tp: Any) -> tuple[Any, Any]:
    """The ge/le of an Annotated[int, Meta(...)]."""
    lo = hi = None
    for meta in typing.get_args(tp)[1:] if typing.get_origin(tp) is Annotated else ():
        if isinstance(meta, msgspec.Meta):
            lo, hi = meta.ge if meta.ge is not None else lo, meta.le if meta.le is not None else hi
    return lo, hi


def _value_at(value: Any, path: list[str | int]) -> Any:
    for step in path:
        value = value[step]
    return value


def _explain(message: str, tp: Any) -> str:
    """msgspec's words for an admin: 'Expected `int` >= 1' -> 'must be at least 1'."""
    lo, hi = _bounds(tp)
    if lo is not None and hi is not None and hi - lo <= 1000 and re.fullmatch(r"Expected `int` [<>]= \S+", message):
        return f"must be {lo} to {hi}"  # a narrow range is told whole
    if m := re.fullmatch(r"Expected `\w+` >= (\S+)", message):
        return f"must be at least {m.group(1)}"
    if m := re.fullmatch(r"Expected `\w+` <= (\S+)", message):
        return f"must be at most {m.group(1)}"
    if m := re.fullmatch(r"Expected `str` of length >= 1", message):
        return "must not be empty"
    if m := re.fullmatch(r"Expected `\w+` of length >= (\d+)", message):
        return f"must hold at least {m.group(1)}"
    if m := re.fullmatch(r"Expected `\w+` of length <= (\d+)", message):
        return f"must hold at most {m.group(1)}"
    if m := re.fullmatch(r"Expected `([\w |]+)`, got `\w+`", message):
        return "must be " + " or ".join(_WORDS.get(w, w) for w in m.group(1).split(" | "))
    if message.startswith("Invalid enum value") and typing.get_origin(_strip(tp)) is Literal:
        words = [f"'{a}'" for a in typing.get_args(_strip(tp))]
        return "must be " + (" or ".join(words) if len(words) < 3 else ", ".join(words[:-1]) + " or " + words[-1])
    return message


def _convert(tp: Any, value: Any, where: str) -> Any:
    """`value` checked against `tp`; Bad names the key and says what is wrong with it."""
    try:
        return msgspec.convert(value, tp, strict=True, dec_hook=dec_hook)
    except msgspec.ValidationError as exc:
        message, sep, at = str(exc).rpartition(" - at `")
        if not sep:
            message, at = str(exc), ""
        path: list[str | int] = [int(p[1:-1]) if p.startswith("[") else p[1:]
                                 for p in re.findall(r"\.[^.\[`]+|\[\d+\]", at.rstrip("`").removeprefix("$"))]
        try:
            got = _value_at(value, path)
        except (LookupError, TypeError):
            got = None
        problem = _explain(message, _type_at(tp, path))
        if problem != message or message.startswith("Expected"):  # the value, as msgspec does not say it
            problem += f", got {shown(got)}"
        key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
        raise Bad(f"{where} {key}".strip() if key else where, problem) from None


def close_matches(word: str, known: list[str]) -> list[str]:
    import difflib  # only when a file has a typo

    return difflib.get_close_matches(word, known, n=1)


def _unknown_keys(tp: Any, value: Any, where: str) -> None:
    """A key the schema does not know is refused (a typo must not silently mean the default)."""
    tp = _strip(tp)
    if not (isinstance(tp, type) and is_dataclass(tp)) or not isinstance(value, dict):
        return
    known = [f.name for f in fields(tp)]
    for key in value:
        if key not in known:
            near = close_matches(str(key), known)
            hint = f" (did you mean {near[0]}?)" if near else f" (known: {', '.join(known)})"
            raise Bad(f"{where} {key}", f"unknown key{hint}")


def read_key(name: str, tp: Any, value: Any) -> Any:
    """One top-level key of the file: a [section], a map of [name.KEY] tables or a value."""
    if typing.get_origin(tp) is dict:
        key_tp, item_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise Bad(f"[{name}]", f"must hold tables like [{name}.NAME], got {shown(value)}")
        out = {}
        for key, item in value.items():
            table = isinstance(_strip(item_tp), type) and is_dataclass(_strip(item_tp))
            where = f"[{name}.{key}]" if table else f"[{name}] {key}"
            _convert(key_tp, key, f"[{name}] {key}")
            _unknown_keys(item_tp, item, where)
            out[key] = _convert(item_tp, item, where)
        return out
    if isinstance(tp, type) and is_dataclass(tp):
        if not isinstance(value, dict):
            raise Bad(f"[{name}]", f"must be a table, got {shown(value)}")
        _unknown_keys(tp, value, f"[{name}]")
        return _convert(tp, value, f"[{name}]")
    return _convert(tp, value, name)


