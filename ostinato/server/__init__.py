"""The OpenAI-compatible HTTP server (FastAPI + uvicorn); see ostinato.server.app."""
from .app import Limits, build_app
from .run import run_server

__all__ = ["build_app", "Limits", "run_server"]
