"""tm4d's blocklists component: lists due a refresh are fetched (in a worker thread) and stored."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from types import SimpleNamespace

import pytest

from tm4.core.config import parse_config
from tm4.daemon import components
from tm4.ops.engine import Core
from tm4.sources import blocklists as bl_mod


def test_component_refreshes_due_lists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bl_mod, "interface_networks", lambda netns="": [])
    monkeypatch.setattr(components, "BLOCKLIST_INTERVAL", 0.05)
    # No kernel here: the store-only namespace trick of the CLI tests.
    monkeypatch.setenv("TM4_NFT_SUBPROCESS", "1")
    cfg = parse_config({"state_dir": str(tmp_path / "s"), "firewall": {"netns": "tm4-test-none"}})
    core = Core(cfg, protect=[])
    f = tmp_path / "list.txt"
    f.write_text("203.0.113.66\n")
    bl_mod.add(core, "a", str(f), refresh="5m")
    bl_mod.add(core, "b", str(f), refresh=None)  # never refreshed by tm4d
    f.write_text("203.0.113.67\n203.0.113.68\n")
    old = core.clock() - bl_mod.parse_duration("1h")
    with core.store.transaction() as db:
        db.execute("UPDATE blocklists SET fetched = ?", (bl_mod.format_time(old),))
    [comp] = [c for c in components.default_components() if c.name == "blocklists"]
    assert comp.module == "tm4.sources.blocklists" and comp.wanted(cfg)

    async def run() -> None:
        task = asyncio.ensure_future(comp.run(SimpleNamespace(core=core), bl_mod))  # type: ignore[arg-type]
        for _ in range(100):
            await asyncio.sleep(0.05)
            if len(bl_mod.get(core.store, "a").nets) == 2:
                break
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert [str(n) for n in bl_mod.get(core.store, "a").nets] == ["203.0.113.67/32", "203.0.113.68/32"]
    assert [str(n) for n in bl_mod.get(core.store, "b").nets] == ["203.0.113.66/32"]
