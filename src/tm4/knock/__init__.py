"""Port knocking in the kernel: the sequence, its nftables stages, credentials, activation.

May import: tm4.core, tm4.firewall, tm4.ops, tm4.asterisk.
"""
