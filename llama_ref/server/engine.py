"""Running many generations off the event loop, batched (docs/server.md, "Many users").

One scheduler thread owns the model and steps a decoding.batch.Batch: each step decodes one
token for every running sequence and prefills a piece of the prompts just admitted.
Embeddings (llama_ref/embedding.py) run in the same steps, as prompts do, holding no
decoding place.
Requests join between steps, in arrival order, while the batch runs fewer than max_batch
sequences (a request with n choices is n sequences) and the KV budget holds their worst
case: n caches of prompt + max_tokens positions. Up to max_queue more requests wait; the
next one is refused at once (`Busy`, a 503). A request whose client goes away is cancelled:
it leaves before the next step, and its slot and memory go to the next in line.

Finished requests leave their cache to the prefix cache (decoding/prefix.py), which lives
inside the same budget and gives way to admitted requests.
"""
import asyncio
import threading
from collections import deque

import numba

from ..decoding.batch import Batch
from ..decoding.generation import Generation
from ..decoding.prefix import PrefixCache
from ..errors import ContextLengthError
from ..nn.transformer import kv_bytes_per_token

DONE = object()   # the last item of a request's queue when it ends normally
GB = 1 << 30


class Busy(Exception):
    """The queue is full."""


class TooLarge(ContextLengthError):
    """A request whose worst case does not fit in the whole KV budget: it could never run."""


class Ticket:
    """A request in the engine: its work (a Generation, or an Embedding) and the queue its
    events go to."""

    def __init__(self, work, reserved: int):
        self.work = work
        self.reserved = reserved                     # bytes of KV cache held for its worst case
        self.sequences = work.sequences              # places in the batch: n for a generation
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def send(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:      # the event loop is gone (server shutting down)
            pass


class Engine:
    def __init__(self, model, max_batch: int = 8, max_queue: int = 8, kv_cache_bytes: int = 4 * GB,
                 prefix_cache_bytes: int = 2 * GB):
        self.max_batch, self.max_queue, self.kv_cache_bytes = max_batch, max_queue, kv_cache_bytes
        self.bytes_per_token = kv_bytes_per_token(model.config)
        self.batch = Batch(model)
        # none with dynamic NTK: a cached key's rotation depends on the chunk it was made in
        self.prefix = PrefixCache(min(prefix_cache_bytes, kv_cache_bytes), self.bytes_per_token,
                                  self.batch.chunk_size) if self.batch.chunk_size else None
        self.generated_tokens = 0       # every token any request produced (for tests and /health)
        self.steps = 0                  # forward passes of the batch (for /metrics)
        self.waiting: deque[Ticket] = deque()
        self.starting: list[Ticket] = []
        self.running: list[Ticket] = []
        self.reserved = 0
        self._cv = threading.Condition()
        self._closed = False
        self._threads = numba.get_num_threads()     # the creator's: Numba counts threads per thread
        self._thread = threading.Thread(target=self._schedule, name="scheduler", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        """The scheduler thread runs (it stops only on close, or on a bug that escaped it)."""
        return self._thread.is_alive()

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet done: running or waiting."""
        return len(self.waiting) + len(self.starting) + len(self.running)

    @property
    def accepting(self) -> bool:
        """Whether a request would be taken now, into the batch or the queue, rather than refused."""
        return len(self.waiting) < self.max_queue or (not self.waiting and self.running_sequences < self.max_batch)

    @property
    def running_sequences(self) -> int:
        return sum(ticket.sequences for ticket in self.starting + self.running)

    def admit(self, work) -> Ticket:
        """A ticket for the work (a Generation or an Embedding), started at once when it fits;
        must be called on the event loop that will read its events."""
        need = work.kv_positions * self.bytes_per_token
        if need > self.kv_cache_bytes:
            raise TooLarge(f"{work.kv_field}: {work.kv_reason} need {need / GB:.2f} GB of KV cache; this server "
                           f"holds {self.kv_cache_bytes / GB:.2f} GB (--kv-cache-gb)", work.kv_field)
        ticket = Ticket(work, need)
        with self._cv:
            if not self.waiting and self._fits(ticket):
                self._start(ticket)
            elif len(self.waiting) >= self.max_queue:
                raise Busy(f"{len(self.waiting)} requests are waiting (--max-queue {self.max_queue}) behind "
                           f"{self.running_sequences} running sequences (--max-batch {self.max_batch})")
            else:
                self.waiting.append(ticket)
        return ticket

    async def events(self, ticket: Ticket):
        """The ticket's events as the scheduler produces them; leaving early cancels it."""
        try:
            while (item := await ticket.queue.get()) is not DONE:
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            self.cancel(ticket)

    def cancel(self, ticket: Ticket) -> None:
        with self._cv:
            ticket.work.cancelled = ticket.work.cancelled or not ticket.work.done
            if ticket in self.waiting:
                self.waiting.remove(ticket)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=30)

    def _fits(self, ticket: Ticket) -> bool:
        running = self.running_sequences
        return (running == 0 or running + ticket.sequences <= self.max_batch) \
            and self.reserved + ticket.reserved <= self.kv_cache_bytes

    def _start(self, ticket: Ticket) -> None:
        self.reserved += ticket.reserved
        if self.prefix is not None:
            self.prefix.shrink(self.kv_cache_bytes - self.reserved)
        self.starting.append(ticket)
        self._cv.notify()

    def _schedule(self) -> None:
        numba.set_num_threads(self._threads)
        while True:
            with self._cv:
                while not self.starting and not self.running and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                for ticket in self.starting:
                    if self.prefix is not None and isinstance(ticket.work, Generation):
                        self.prefix.start(ticket.work)
                    self.batch.add(ticket.work)
                self.running += self.starting
                self.starting = []
            try:
                self.steps += 1
                events = self.batch.step()
            except Exception as err:     # handed to every request in the step, which reports it
                for ticket in self.running:
                    ticket.send(err)
                    ticket.work.cancelled = True
                self.batch.generations.clear()
                events = {}
            for ticket in self.running:
                produced = events.get(ticket.work, ())
                for event in produced:
                    ticket.send(event)
                self.generated_tokens += len(produced)
            self._finish([ticket for ticket in self.running if ticket.work.done])

    def _finish(self, tickets: list[Ticket]) -> None:
        with self._cv:
            for ticket in tickets:
                self.running.remove(ticket)
                self.reserved -= ticket.reserved
                ticket.send(DONE)
                self._keep_prefix(ticket.work)
            while self.waiting and self._fits(self.waiting[0]):
                self._start(self.waiting.popleft())

    def _keep_prefix(self, work) -> None:
        if self.prefix is None or not isinstance(work, Generation) or not work.caches:
            return
        self.prefix.keep(work.prompt_ids, work.caches[0])
        self.prefix.shrink(self.kv_cache_bytes - self.reserved)
