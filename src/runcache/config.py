"""Settings: one table that drives the defaults, the environment, the CLI flags and the docs.

Every setting is a field of :class:`Config` with its default and a line of help.
``RUNCACHE_<NAME>`` sets it from the environment and ``--<name>`` from the command
line, so adding a setting here is all it takes to expose it everywhere; a test
checks that the README documents each one.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from runcache.errors import ConfigError

MiB = 1024 * 1024


def _setting(default: Any, help: str, minimum: float | None = None) -> Any:
    return field(default=default, metadata={"help": help, "minimum": minimum})


@dataclass(frozen=True)
class Config:
    """Everything an operator can set, with the defaults existing clients expect."""

    host: str = _setting("127.0.0.1", "Address to listen on.")
    port: int = _setting(8888, "TCP port to listen on (0 picks a free one).", 0)
    store: str = _setting(
        "memory://",
        "Where cached results live: memory://, sqlite:///path.db or redis://host:port/db.",
    )
    max_entries: int = _setting(1000, "Most cached results held at once.", 1)
    max_bytes: int = _setting(256 * MiB, "Most bytes of cached results held at once.", 1)
    default_ttl: float = _setting(3600.0, "Seconds a cached result lives unless asked.", 0.001)
    max_ttl: float = _setting(30 * 86400.0, "Longest ttl a request may ask for.", 0.001)
    default_timeout: float = _setting(300.0, "Seconds a command may run unless asked.", 0.001)
    max_timeout: float = _setting(3600.0, "Longest timeout a request may ask for.", 0.001)
    max_output_bytes: int = _setting(8 * MiB, "Bytes of stdout and of stderr kept per run.", 1)
    max_body_bytes: int = _setting(1 * MiB, "Largest request body accepted (413 past it).", 1)
    threads: int = _setting(64, "Worker threads serving HTTP requests.", 1)
    log_level: str = _setting("INFO", "Logging level: DEBUG, INFO, WARNING or ERROR.")

    def __post_init__(self) -> None:
        for setting in dataclasses.fields(self):
            minimum = setting.metadata["minimum"]
            value = getattr(self, setting.name)
            if minimum is not None and value < minimum:
                raise ConfigError(f"{setting.name} must be at least {minimum}, got {value}")
        if self.default_timeout > self.max_timeout:
            raise ConfigError("default_timeout must not exceed max_timeout")
        if self.default_ttl > self.max_ttl:
            raise ConfigError("default_ttl must not exceed max_ttl")
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ConfigError(f"log_level must be DEBUG, INFO, WARNING or ERROR, got {self.log_level}")

    @classmethod
    def load(
        cls,
        overrides: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Config:
        """Build a config from the defaults, then the environment, then explicit overrides."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for setting in settings():
            if setting.env_var in environ:
                values[setting.name] = setting.parse(environ[setting.env_var], setting.env_var)
        for name, value in (overrides or {}).items():
            if value is None:
                continue
            if name not in _FIELD_NAMES:
                raise ConfigError(f"unknown setting {name!r}")
            values[name] = value
        return cls(**values)


@dataclass(frozen=True)
class Setting:
    """One row of the settings table, as the CLI and the docs see it."""

    name: str
    default: Any
    help: str

    @property
    def env_var(self) -> str:
        return "RUNCACHE_" + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def kind(self) -> type:
        return type(self.default)

    def parse(self, text: str, source: str) -> Any:
        """Turn the text of an environment variable or flag into the setting's type."""
        try:
            return self.kind(text)
        except ValueError:
            raise ConfigError(f"{source} must be a {self.kind.__name__}, got {text!r}") from None


def settings() -> Iterator[Setting]:
    """The settings table, in the order the fields are declared."""
    for item in dataclasses.fields(Config):
        yield Setting(item.name, item.default, item.metadata["help"])


_FIELD_NAMES = frozenset(item.name for item in dataclasses.fields(Config))
