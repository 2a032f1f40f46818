"""The HTTP API (FastAPI): app factory, routes, schemas, auth and limits. Never imports torch."""

from server.api.app import create_app, metrics_for, start_draining

__all__ = ["create_app", "metrics_for", "start_draining"]
