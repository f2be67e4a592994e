"""tm4: a deny-by-default whitelist firewall for Asterisk phone servers."""

__version__ = "0.1.0"
