"""Where entries come from besides the admin: trusted SIP providers, the Travelin' Man 3 import.

May import: tm4.core, tm4.firewall, tm4.ops, tm4.asterisk.
"""
