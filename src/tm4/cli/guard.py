"""tm4 guard: run the AMI guard in the foreground; replay a capture through its policy."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from tm4.cli.common import Ctx, echo_line, pass_ctx


def decision_json(d: Any, **extra: Any) -> dict[str, Any]:
    from tm4.core.durations import format_duration
    from tm4.guard.policy import BanDecision, PromoteDecision, RevokeDecision

    if isinstance(d, BanDecision):
        out: dict[str, Any] = {"action": "ban", "address": d.address, "ttl": format_duration(d.ttl),
                               "event": d.event.value, "count": d.count, "rule": d.rule,
                               "offences": d.offences, "reason": d.reason}
    elif isinstance(d, PromoteDecision):
        out = {"action": "promote", "name": d.name, "address": str(d.address),
               "ttl": format_duration(d.ttl), "account": d.account}
    elif isinstance(d, RevokeDecision):
        out = {"action": "revoke", "name": d.name, "address": str(d.address), "event": d.event.value}
    else:  # pragma: no cover
        out = {"action": type(d).__name__}
    out.update(extra)
    return out


@click.group("guard", invoke_without_command=True)
@click.option("--dry-run", is_flag=True, help="decide and report, but change nothing")
@click.option("--json", "as_json", is_flag=True, help="print each decision as one JSON line")
@click.option("-v", "--verbose", is_flag=True, help="log connection and event details")
@click.pass_context
def guard(cctx: click.Context, dry_run: bool, as_json: bool, verbose: bool) -> None:
    """Run the AMI guard in the foreground until Ctrl-C (tm4d hosts the same guard).

    Logs in to Asterisk's manager interface with [ami] from tm4.toml, reads the
    security events and bans attackers in the kernel (see [guard])."""
    if cctx.invoked_subcommand is not None:
        return
    ctx = cctx.find_object(Ctx)
    assert ctx is not None
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    core = ctx.core
    if not dry_run and not core.backend.present():
        click.echo("tm4: warning: tm4's rule set is not loaded; bans are stored but not enforced "
                   "until `tm4 apply`", err=True)
    asyncio.run(_run(core, dry_run, as_json))


async def _run(core: Any, dry_run: bool, as_json: bool) -> None:
    from tm4.guard.runtime import Applied, GuardRuntime

    def report(rec: Applied) -> None:
        ms = round((rec.done - rec.received) * 1000, 2)
        if as_json:
            click.echo(json.dumps(decision_json(rec.decision, ms=ms, error=rec.error or None,
                                                dry_run=dry_run)))
        else:
            d = decision_json(rec.decision)
            what = d.get("address") or d.get("name")
            tail = f" ({rec.error})" if rec.error else ""
            echo_line(f"{d['action']} {what} {d.get('ttl', '')} {d.get('reason', '')} [{ms} ms]{tail}")
        sys.stdout.flush()

    rt = GuardRuntime(core, dry_run=dry_run, on_decision=report)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stopping.set)
    task = asyncio.ensure_future(rt.run())
    waiter = asyncio.ensure_future(stopping.wait())
    await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    await rt.close()
    waiter.cancel()
    await asyncio.gather(task, return_exceptions=True)
    if task.done() and not task.cancelled() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]


@guard.command("replay")
@click.argument("capture", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="one JSON object per event")
@pass_ctx
def replay(ctx: Ctx, capture: Path, as_json: bool) -> None:
    """Run a saved AMI byte stream (a capture, a sample file) through the policy.

    Prints each security event's verdict and what the guard would decide; changes
    nothing. Time is taken from EventTV. Only loopback counts as protected here."""
    from tm4.asterisk.events import FrameParser, to_security_event
    from tm4.guard.policy import Guard, classify

    def protected(net: Any) -> bool:
        return bool(net.network_address.is_loopback)

    g = Guard(ctx.config.guard, protected=protected, clock=lambda: 0.0)
    data = b"\r\n".join(ln for ln in capture.read_bytes().split(b"\r\n") if not ln.startswith(b"# "))
    t0: float | None = None
    for i, frame in enumerate(FrameParser().feed(data)):
        ev = to_security_event(frame)
        if ev is None:
            continue
        t = _event_time(ev.frame.get("EventTV")) or i * 0.001
        t0 = t if t0 is None else t0
        decisions = g.observe(ev, t - t0)
        remote = str(ev.remote) if ev.remote else "?"
        if as_json:
            click.echo(json.dumps({"t": round(t - t0, 3), "event": ev.type.value, "service": ev.service,
                                   "remote": remote, "account": ev.account, "verdict": classify(ev).value,
                                   "decisions": [decision_json(d) for d in decisions]}))
        else:
            echo_line(f"{t - t0:9.3f} {ev.type.value:24} {ev.service:6} {remote:32} {classify(ev).value}")
            for d in decisions:
                dj = decision_json(d)
                echo_line(f"          -> {dj['action']} {dj.get('address') or dj.get('name')} "
                          f"{dj.get('ttl', '')} {dj.get('reason', '')}")
    if not as_json:
        s = g.stats
        click.echo(f"{s.events} events, {s.failures} failures = {s.attempts} attempts "
                   f"({s.duplicates} duplicates), {s.challenges} challenges, {s.bans} bans")


def _event_time(text: str | None) -> float | None:
    if not text:
        return None
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
    except ValueError:
        return None


def register(cli: click.Group) -> None:
    cli.add_command(guard)
