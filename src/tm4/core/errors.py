"""One exception hierarchy; the CLI turns any Tm4Error into one line and exit code 1."""


class Tm4Error(Exception):
    """Root of every error tm4 reports to an admin."""


class ConfigError(Tm4Error):
    """The config file is missing, unreadable or holds a bad value."""


class ValidationError(Tm4Error):
    """An input (address, name, service, duration, DTMF...) was refused."""


class NeverSourceError(ValidationError):
    """An address no packet the kernel sees can come from (multicast, broadcast,
    unspecified...): never banned or granted (tm4.core.model.never_source_reason)."""


class ConflictError(Tm4Error):
    """The operation clashes with what exists (duplicate name, whitelisted ban...)."""


class NotFoundError(Tm4Error):
    """The named entry, ban or passcode does not exist."""


class ApplyError(Tm4Error):
    """The kernel refused a rule set; the previous one stays in force."""


class LockoutError(Tm4Error):
    """The change would shut out the admin's own SSH session."""


class StoreError(Tm4Error):
    """The state store could not be read or written."""
