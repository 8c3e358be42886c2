"""The OpenAI-compatible HTTP server (FastAPI + uvicorn); see ostinato.server.app."""
from .app import Limits, build_app
from .run import run_server

__all__ = ["Limits", "build_app", "run_server"]
