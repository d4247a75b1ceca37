"""Options of install(): keyword arguments and ``LOOPSCOPE_*`` environment variables.

Every option can be given either way; a keyword argument wins over the environment.
Validation happens before anything is installed, so a bad value leaves nothing behind.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from prometheus_client.registry import REGISTRY, CollectorRegistry

__all__ = ["ConfigError", "Options", "resolve_options"]


class ConfigError(ValueError):
    """An option or ``LOOPSCOPE_*`` environment variable has a value loopscope cannot use."""


@dataclass(frozen=True)
class Options:
    """The validated configuration of one install()."""

    slow_threshold: float = 0.1
    """Seconds; a step at or over this is a slow step."""
    lag_interval: float = 0.01
    """Seconds between two heartbeats of the lag probe."""
    port: int | None = None
    """TCP port of the /metrics endpoint; None serves nothing, 0 picks a free port."""
    addr: str = "127.0.0.1"
    """Address the /metrics endpoint binds."""
    loop_name: str | None = None
    """Value of the ``loop`` label; None names each loop after its thread."""
    slow_events: bool = True
    """Log a ``slow_callback`` event through structlog for every slow step."""
    max_loop_labels: int = 50
    """Distinct ``loop`` label values kept before further loops are counted as ``other``."""
    registry: CollectorRegistry = field(default=REGISTRY, compare=False)
    """prometheus_client registry the collector is registered on."""


def _parse_seconds(name: str, raw: object, *, upper: float = 3600.0) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise ConfigError(f"{name} must be a number of seconds (> 0 and <= {upper:g}); got {raw!r}")
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(
            f"{name} must be a number of seconds (> 0 and <= {upper:g}); got {raw!r}"
        ) from None
    if not math.isfinite(value) or value <= 0 or value > upper:
        raise ConfigError(f"{name} must be a number of seconds (> 0 and <= {upper:g}); got {raw!r}")
    return value


def _parse_port(name: str, raw: object) -> int | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        text = raw.strip()
        if text == "":
            return None
        if not text.isdigit():
            raise ConfigError(f"{name} must be a TCP port from 0 to 65535; got {raw!r}")
        raw = int(text)
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= 65535:
        raise ConfigError(f"{name} must be a TCP port from 0 to 65535; got {raw!r}")
    return raw


def _parse_addr(name: str, raw: object) -> str:
    if not isinstance(raw, str) or not raw.strip() or any(c.isspace() for c in raw):
        raise ConfigError(
            f"{name} must be a host name or IP address such as '127.0.0.1'; got {raw!r}"
        )
    return raw


def _parse_loop_name(name: str, raw: object) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or not raw or len(raw) > 128 or not raw.isprintable():
        raise ConfigError(f"{name} must be a printable string of 1 to 128 characters; got {raw!r}")
    return raw


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse_bool(name: str, raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
        return raw.strip().lower() in _TRUE
    raise ConfigError(f"{name} must be true or false (1/0, yes/no, on/off); got {raw!r}")


def _parse_label_cap(name: str, raw: object) -> int:
    if isinstance(raw, str) and raw.strip().isdigit():
        raw = int(raw.strip())
    if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= 10_000:
        raise ConfigError(f"{name} must be a whole number from 1 to 10000; got {raw!r}")
    return raw


def _parse_registry(name: str, raw: object) -> CollectorRegistry:
    if not isinstance(raw, CollectorRegistry):
        raise ConfigError(f"{name} must be a prometheus_client CollectorRegistry; got {raw!r}")
    return raw


_PARSERS: dict[str, Callable[[str, object], Any]] = {
    "slow_threshold": _parse_seconds,
    "lag_interval": lambda name, raw: _parse_seconds(name, raw, upper=60.0),
    "port": _parse_port,
    "addr": _parse_addr,
    "loop_name": _parse_loop_name,
    "slow_events": _parse_bool,
    "max_loop_labels": _parse_label_cap,
    "registry": _parse_registry,
}

#: Options that have no environment variable (they are Python objects).
_NO_ENV = frozenset({"registry"})

ENV_PREFIX = "LOOPSCOPE_"


def env_name(option: str) -> str:
    """The environment variable that sets ``option``."""
    return ENV_PREFIX + option.upper()


def resolve_options(
    kwargs: Mapping[str, object], environ: Mapping[str, str] | None = None
) -> Options:
    """Validate keyword arguments and ``LOOPSCOPE_*`` variables into one :class:`Options`.

    Raises :class:`ConfigError` naming the option (and the variable) at the first bad value.
    """
    known = [f.name for f in fields(Options)]
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(map(repr, unknown))}; "
            f"known options are {', '.join(known)}"
        )
    env = os.environ if environ is None else environ
    known_env = {env_name(n) for n in known if n not in _NO_ENV}
    # Variables the library itself reads elsewhere, not install() options.
    known_env |= {"LOOPSCOPE_PURE_PYTHON"}
    stray = sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in known_env)
    if stray:
        raise ConfigError(
            f"unknown environment variable(s) {', '.join(stray)}; "
            f"known ones are {', '.join(sorted(known_env))}"
        )
    values: dict[str, Any] = {}
    for name in known:
        parse = _PARSERS[name]
        if name in kwargs:
            values[name] = parse(f"option {name}", kwargs[name])
        elif name not in _NO_ENV and env_name(name) in env:
            values[name] = parse(f"environment variable {env_name(name)}", env[env_name(name)])
    return Options(**values)
