"""The operations every way in calls: the Core (allow, revoke, block, unblock, apply), the root operations of the control socket and the socket itself, lock-out protection, confirm, drift detection, safe mode.

May import: tm4.core, tm4.firewall.
"""
