"""The HTTP server (`llama-ref serve`): see app.py."""
from .app import ServerSettings, create_app

__all__ = ["ServerSettings", "create_app"]
