"""The app factory: a Flask app around one engine."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask

from runcache import auth
from runcache.api import api, register_error_handlers
from runcache.config import Config
from runcache.openapi import docs
from runcache.service import Engine


def create_app(
    config: Config | None = None,
    engine: Engine | None = None,
    test_config: dict[str, Any] | None = None,
) -> Flask:
    """Build the app from a config (defaults, then the environment, when none is given).

    ``engine`` lets the CLI and the tests supply one already built; otherwise the
    app builds its own from the config. ``test_config`` overrides Flask settings.
    """
    if engine is None:
        engine = Engine.from_config(config or Config.load())
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = engine.config.max_body_bytes
    app.config.update(test_config or {})
    app.extensions["runcache"] = engine
    app.register_blueprint(api)
    app.register_blueprint(docs)
    auth.init_app(app, engine.config)
    register_error_handlers(app)
    return app


def configure_logging(level: str) -> None:
    """Readable one-line logs on stderr; the per-request access log stays off."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
