"""Test vectors: every question a run of the checks asked the oracle, with its answer, so that
the checks run again without the model (`llama-ref conform --vectors DIR`), in another
project's CI.

`export` runs every check against llama-ref's own server on a thread of this process, with
the oracle behind a recorder. The checks ask the oracle everything a server's answers could
lead them to ask (each alternative's distribution, the tie gap at every greedy step) before
they look at those answers, so a run against another server asks nothing new.

DIR/vectors.json (docs/conformance.md, "Test vectors"):
    {"schema": 1, "llama_ref": version, "model": what the oracle loaded, "samples": draws per
     setting, "seed": the first seed, "checks": {check: verdict against llama-ref},
     "answers": [{"question": an Oracle method, "args": [...], "answer": ...}, ...]}
"""
import json
from importlib.metadata import version
from pathlib import Path

from ..errors import LlamaRefError
from ..files import atomic_output
from ..server.thread import ThreadServer
from .client import Target
from .kit import Kit, run
from .oracle import Oracle

SCHEMA = 1
FILE = "vectors.json"


class VectorsError(LlamaRefError):
    """The vectors are unreadable, of another schema, or lack an answer a check asked for."""


def question(name: str, args) -> str:
    return json.dumps([name, list(args)], sort_keys=True, ensure_ascii=False)


class RecordingOracle:
    """An Oracle whose every answer is kept (as the JSON it is written as, so that a check sees
    exactly what it will see when the answer is read back)."""

    def __init__(self, oracle: Oracle):
        self._oracle = oracle
        self.answers: dict[str, object] = {}

    def __getattr__(self, name):
        method = getattr(self._oracle, name)

        def ask(*args):
            key = question(name, args)
            if key not in self.answers:
                self.answers[key] = json.loads(json.dumps(method(*args)))
            return self.answers[key]
        return ask


class ReplayOracle:
    """Answers from recorded vectors; a question they do not hold is an error naming it."""

    def __init__(self, answers: dict[str, object]):
        self.answers = answers

    def __getattr__(self, name):
        def ask(*args):
            key = question(name, args)
            if key not in self.answers:
                raise VectorsError(f"the vectors hold no answer to {name}{tuple(args)!r:.200}")
            return self.answers[key]
        return ask


def export(model_path: str, directory: Path, samples: int, seed: int, model=None, served=None) -> tuple[dict, list]:
    """Record the oracle's answers to every check run against llama-ref's own server; write
    DIR/vectors.json whole or not at all; return (the vectors, the run's results). `model` and
    `served` (two loads of model_path, one for the oracle and one for the server) may be given
    to save loading them again."""
    from ..api import load_model
    recording = RecordingOracle(Oracle(model or load_model(model_path)))
    server = ThreadServer(served or load_model(model_path), served_model_name="reference")
    try:
        kit = Kit(Target(server.url, "reference"), recording, samples=samples, seed=seed)
        results = run(kit, progress=False)
    finally:
        server.stop()
    vectors = {"schema": SCHEMA, "llama_ref": version("llama-ref"), "model": str(model_path), "samples": samples,
               "seed": seed, "checks": {r.check: r.verdict for r in results},
               "answers": [{"question": json.loads(k)[0], "args": json.loads(k)[1], "answer": v}
                           for k, v in recording.answers.items()]}
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_output(directory / FILE) as part:
        part.write_text(json.dumps(vectors, ensure_ascii=False))
    return vectors, results


def load(directory: Path) -> tuple[ReplayOracle, dict]:
    """(an oracle answering from DIR/vectors.json, the file's header)."""
    path = Path(directory) / FILE
    try:
        vectors = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise VectorsError(f"--vectors {directory}: cannot read {FILE}: {err}") from None
    if vectors.get("schema") != SCHEMA:
        raise VectorsError(f"--vectors {directory}: schema {vectors.get('schema')!r}; this llama-ref reads {SCHEMA}")
    answers = {question(a["question"], a["args"]): a["answer"] for a in vectors["answers"]}
    return ReplayOracle(answers), {k: v for k, v in vectors.items() if k != "answers"}
