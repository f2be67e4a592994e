"""DNS names in the whitelist: the stub client, one lookup, and the TTL-aware refresher.

May import: tm4.core, tm4.firewall, tm4.ops, tm4.asterisk.
"""
