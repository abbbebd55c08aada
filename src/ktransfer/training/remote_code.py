"""Switches that run code come from this command line or the environment, never from a config file.

``model.trust_remote_code=true`` lets a model folder's own Python code run (``auto_map``). A YAML file, whether a
shared config or a run folder's ``config.yaml``, could be written by someone else; so it may not turn the switch on:
only a ``KEY=VALUE`` item of the current command line or ``KTRANSFER_TRUST_REMOTE_CODE=1`` may, and
``save_config`` never saves it on.
"""

from __future__ import annotations

import os
from typing import Any

KEY, ENV = "model.trust_remote_code", "KTRANSFER_TRUST_REMOTE_CODE"
OFF = ("false", "0", "no", "off", "none", "null")


def refused_in_files(entries: list[tuple[str, Any, str]]) -> str | None:
    """The error message for the first config-file entry ``(key, value, source)`` that turns the switch on, else
    None (``source`` is ``FILE:LINE``)."""
    for key, value, source in entries:
        if key == KEY and value not in (False, None) and str(value).strip().lower() not in OFF:
            return (f"{source}: {KEY}: {value!r} is refused in a config file: code shipped with a model folder runs "
                    f"only when this command asks, e.g. ktransfer train ... {KEY}=true (or {ENV}=1), after reading "
                    "that code")
    return None


def from_env() -> list[str]:
    """``["model.trust_remote_code=true"]`` when ``KTRANSFER_TRUST_REMOTE_CODE`` is 1/true/yes/on, else ``[]``."""
    on = os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes", "on")
    return [f"{KEY}=true"] if on else []
