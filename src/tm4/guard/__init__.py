"""The guard: security events in, bans out. policy is pure and clock-injectable; runtime wires AMI to the Core.

May import: tm4.core, tm4.firewall, tm4.ops, tm4.asterisk.
"""
