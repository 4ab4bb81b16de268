"""The root of eddy's error tree: every error a caller can act on derives from EddyError."""


class EddyError(Exception):
    """Something eddy could not do; the message says what to change."""


class SpecError(EddyError):
    """The pipeline spec is invalid; the message names the field and what is allowed."""


class ConfigError(EddyError):
    """A setting or flag is invalid; the message names the fix."""


class ServiceError(EddyError):
    """A service (broker, Redis, an engine) could not start or be reached."""
