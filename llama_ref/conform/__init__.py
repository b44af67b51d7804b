"""The conformance kit: checks another OpenAI-compatible server against the reference
semantics (docs/spec/), with llama-ref running the same weights locally as the oracle.
docs/conformance.md says what each check does and how to run it."""
# Each module registers its checks; the import order is the order they run and report in.
from . import tokens  # noqa: F401, I001  (1-3: tokenization, greedy, logprobs)
from . import distributions  # noqa: F401  (4: sampling)
from . import penalties  # noqa: F401  (5: penalties)
from . import text  # noqa: F401  (6-7: stop, streaming)
from . import limits  # noqa: F401  (8-10: seeds, limits, json_mode)
from . import peers, vectors  # noqa: F401
from .client import DIALECTS, Target
from .kit import CHECKS, Kit, run
from .oracle import Oracle
from .report import Result, markdown, to_json

__all__ = ["CHECKS", "DIALECTS", "Kit", "Oracle", "Result", "Target", "markdown", "peers", "run", "to_json", "vectors"]
