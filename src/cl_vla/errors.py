"""User-facing errors: one sentence naming the bad value and what is allowed."""

from __future__ import annotations


class CLVLAError(Exception):
    """Base of the errors cl_vla reports to users as one sentence, without a traceback."""


class ConfigError(CLVLAError, ValueError):
    """A configuration value is invalid."""


class DataError(CLVLAError, ValueError):
    """A dataset is missing, malformed, or does not match the task sequence."""


def one_of(values: object) -> str:
    """Render allowed values for a message: ``'a', 'b' or 'c'``."""
    vals = [repr(v) for v in values]  # type: ignore[attr-defined]
    if not vals:
        return "(none)"
    return vals[0] if len(vals) == 1 else ", ".join(vals[:-1]) + " or " + vals[-1]
