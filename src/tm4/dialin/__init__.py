"""Dial-in: the call as a state machine, DTMF parsing, the AGI and FastAGI transports, passcodes, limits, the operations the Asterisk group may call, the external address.

May import: tm4.core, tm4.firewall, tm4.ops, tm4.asterisk.
"""
