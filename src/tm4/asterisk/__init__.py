"""Asterisk's side: the AMI client and security events, ACL files and their reload, config parsing, install, the manager user, trunk discovery.

May import: tm4.core, tm4.firewall, tm4.ops.
"""
