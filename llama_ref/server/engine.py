"""Running generations off the event loop, one at a time, in arrival order.

The model computes on every core, so requests do not run side by side: one worker thread
takes them first come, first served. At most `max_queue` requests are admitted (running or
waiting); the next one is refused at once (`Busy`, a 503). A request whose client goes away
is cancelled: its worker stops before the next token.
"""
import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor


class Busy(Exception):
    """The queue is full."""


class Engine:
    def __init__(self, max_queue: int):
        self.max_queue = max_queue
        self.generated_tokens = 0              # every token any request produced (for tests and /health)
        self._admitted = 0
        self._lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generation")

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet done: running or waiting."""
        return self._admitted

    def admit(self) -> None:
        with self._lock:
            if self._admitted >= self.max_queue:
                raise Busy(f"{self._admitted} requests are running or waiting (--max-queue {self.max_queue})")
            self._admitted += 1

    def _release(self) -> None:
        with self._lock:
            self._admitted -= 1

    async def events(self, generation):
        """Iterate `generation` on the worker thread, yielding its events here as they come.
        admit() must have succeeded first; the slot is released when the worker is done."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()
        done = object()

        def work():
            try:
                if cancelled.is_set():     # the client left while waiting
                    return
                for event in generation:
                    self.generated_tokens += 1
                    loop.call_soon_threadsafe(queue.put_nowait, event)
                    if cancelled.is_set():
                        return
                loop.call_soon_threadsafe(queue.put_nowait, done)
            except Exception as err:   # handed to the request, which reports it
                loop.call_soon_threadsafe(queue.put_nowait, err)
            finally:
                self._release()

        loop.run_in_executor(self._worker, work)
        try:
            while (item := await queue.get()) is not done:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            cancelled.set()
