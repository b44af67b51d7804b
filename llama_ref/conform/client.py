"""The server under test, seen through HTTP: one request at a time, each kept as evidence.

`Target` speaks the OpenAI-compatible API. A dialect renames the parameters a peer spells
its own way (llama.cpp's `repeat_penalty`); every sampling parameter is sent on every request
at the value the check chose, neutral when the check does not vary it, so that a server's own
defaults (llama-cpp-python: top_k 40, min_p 0.05, repeat_penalty 1.1) never pass for its
semantics.
"""
import json
from dataclasses import dataclass, field

import httpx

# The neutral value of every sampling parameter the kit sends (docs/spec/sampling.md step 0).
NEUTRAL = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
           "presence_penalty": 0.0, "frequency_penalty": 0.0}
DIALECTS = {"openai": {}, "llama.cpp": {"repetition_penalty": "repeat_penalty"}}


@dataclass
class Exchange:
    """One request and what came back: a JSON body, or the data payloads of an SSE stream."""
    route: str
    request: dict
    status: int
    body: dict | None = None                       # the parsed JSON body (an error's too)
    events: list = field(default_factory=list)     # streamed: each `data:` payload, parsed ([DONE] kept as a str)
    framing: list[str] = field(default_factory=list)   # streamed: lines that are not SSE framing
    raw: str = ""                                  # the first 2,000 characters as received

    def excerpt(self, limit: int = 300) -> str:
        return self.raw[:limit] + ("…" if len(self.raw) > limit else "")

    def choice(self, index: int = 0) -> dict:
        return self.body["choices"][index]


class Target:
    def __init__(self, base_url: str, model: str, api_key: str | None = None, dialect: str = "openai",
                 timeout: float = 120.0):
        if dialect not in DIALECTS:
            raise ValueError(f"dialect must be one of {', '.join(DIALECTS)}; got {dialect!r}")
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.model = model
        self.dialect = dialect
        self.requests = 0
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(headers=headers, timeout=timeout)

    def body(self, extra: dict, sampling: dict) -> dict:
        """The request body: the model, every sampling parameter (neutral unless `sampling` sets
        it), in this dialect's spelling, then the route's own fields."""
        names = DIALECTS[self.dialect]
        chosen = {**NEUTRAL, **sampling}
        return {"model": self.model, **{names.get(k, k): v for k, v in chosen.items()}, **extra}

    def complete(self, prompt: str, sampling: dict | None = None, **extra) -> Exchange:
        return self.post("/completions", self.body({"prompt": prompt, **extra}, sampling or {}))

    def chat(self, messages: list[dict], sampling: dict | None = None, **extra) -> Exchange:
        return self.post("/chat/completions", self.body({"messages": messages, **extra}, sampling or {}))

    def post(self, route: str, request: dict) -> Exchange:
        self.requests += 1
        for attempt in (1, 2):
            try:
                if request.get("stream"):
                    return self.stream(route, request)
                response = self.http.post(self.base_url + route, json=request)
                break
            except httpx.RemoteProtocolError as err:
                # A kept-alive connection the server closed while the kit was computing: send
                # once more on a new one (as urllib3 does), then count it as the server's.
                if attempt == 2:
                    return Exchange(route, request, 0, raw=f"the connection failed: {type(err).__name__}: {err}")
            except httpx.TransportError as err:   # the server dropped the connection or never answered
                return Exchange(route, request, 0, raw=f"the connection failed: {type(err).__name__}: {err}")
        try:
            body = response.json()
        except ValueError:
            body = None
        return Exchange(route, request, response.status_code, body, raw=response.text[:2000])

    def stream(self, route: str, request: dict) -> Exchange:
        exchange = Exchange(route, request, 0)
        with self.http.stream("POST", self.base_url + route, json=request) as response:
            exchange.status = response.status_code
            lines = []
            for line in response.iter_lines():
                lines.append(line)
                if line.startswith("data:"):
                    payload = line[5:].strip()
                    exchange.events.append(payload if payload == "[DONE]" else parse_json(payload))
                elif line and not line.startswith((":", "event:", "id:", "retry:")):
                    exchange.framing.append(line)
            exchange.raw = "\n".join(lines)[:2000]
        if exchange.status >= 400 and not exchange.events:
            exchange.body = parse_json(exchange.raw)
        return exchange


def token_logprobs(choice: dict) -> tuple[str, list[dict]] | None:
    """(shape, [{"token", "id", "logprob", "top": [(token, id, logprob)]}]) of a choice's
    log-probabilities: OpenAI's legacy completions shape ({tokens, token_logprobs,
    top_logprobs}) or the chat shape ({content: [{token, logprob, top_logprobs, (id)}]}), which
    some servers also return for completions. None when there are none."""
    logprobs = choice.get("logprobs") or {}
    if logprobs.get("token_logprobs") is not None:
        tops = logprobs.get("top_logprobs") or [None] * len(logprobs["token_logprobs"])
        return "legacy", [{"token": t, "id": None, "logprob": lp,
                           "top": [(k, None, v) for k, v in (top or {}).items()]}
                          for t, lp, top in zip(logprobs.get("tokens") or [], logprobs["token_logprobs"], tops)]
    if logprobs.get("content") is not None:
        return "chat", [{"token": e.get("token"), "id": e.get("id"), "logprob": e.get("logprob"),
                         "top": [(t.get("token"), t.get("id"), t.get("logprob")) for t in e.get("top_logprobs") or []]}
                        for e in logprobs["content"]]
    return None


def parse_json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return {"unparsable": text[:200]}
