"""tm4d: its command line, the asyncio host, hosted components, the control socket dispatch, drift repair, config reload, the ACL follower, systemd, init and status.

May import every package but tm4.cli and tm4.lab.
"""
