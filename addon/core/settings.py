"""The ``SECTION.FIELD=VALUE`` form of one configuration setting, shared by the backend's
``--set`` (backend/config.py, ``Config.with_settings``) and the panel's Overrides field
(addon/blender/actions.py). Standard library only."""

from __future__ import annotations

import tomllib
from typing import Any, Iterable

EXAMPLE = "losses.optical_flow=0.05"


def parse_setting(item: str) -> tuple[list[str], Any, str]:
    """``"model.texture_grid.log2_hashmap_size=20"`` -> (key path, value, value text).

    The value is a TOML value (``0.05``, ``true``, ``"shared"``); text that is not one is taken
    as a bare string (``shared``). Raises ValueError when ``item`` is not of this form."""
    key, sep, text = str(item).partition("=")
    parts = [k.strip() for k in key.split(".")]
    if not sep or len(parts) < 2 or not all(parts):
        raise ValueError(f"a setting is SECTION.FIELD=VALUE (e.g. {EXAMPLE}), got {str(item).strip()!r}")
    text = text.strip()
    try:
        value: Any = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return parts, value, text


def nested(parts: list[str], value: Any) -> dict[str, Any]:
    """(["a", "b", "c"], v) -> {"a": {"b": {"c": v}}}."""
    out: Any = value
    for k in reversed(parts):
        out = {k: out}
    return out


def settings_table(items: Iterable[str]) -> dict[str, Any]:
    """Several settings as one nested table, a later one winning. Raises ValueError."""
    out: dict[str, Any] = {}
    for item in items:
        parts, value, _ = parse_setting(item)
        node = out
        for k in parts[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"{'.'.join(parts)!r} sets a field inside a value")
        node[parts[-1]] = value
    return out
