"""The HTTP server (`llama-ref serve`): see app.py."""
from .app import create_app
from .state import ServerSettings

__all__ = ["ServerSettings", "create_app"]
