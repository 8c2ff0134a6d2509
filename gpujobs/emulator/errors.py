"""Errors raised by the Vast.ai emulator."""


class EmulatorError(Exception):
    """Root of every error the emulator raises."""


class FaultPlanError(EmulatorError, ValueError):
    """A fault plan file or rule is invalid; the message names the rule and the field."""


class QueryError(EmulatorError, ValueError):
    """A search or list query uses an unknown operator, column or malformed value."""
