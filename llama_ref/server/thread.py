"""The server on a thread of this process: what the conformance kit records its test vectors
against (conform/vectors.py), and what tests use to hold or break the model mid-request."""
import socket
import threading
import time

import uvicorn

from .app import create_app
from .state import ServerSettings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """create_app(settings, models) served by uvicorn on a daemon thread, on a free port."""

    def __init__(self, model, served_model_name: str = "tiny", **settings):
        self.app = create_app(ServerSettings(served_model_name=served_model_name, **settings), model)
        self.state = self.app.state.server
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.uvicorn = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.uvicorn.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)
