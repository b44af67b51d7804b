"""A check's verdict and the report: Markdown for people, JSON for programs."""
import json
from dataclasses import asdict, dataclass, field

SEVERITY = {"pass": 0, "skipped": 0, "diverges": 1, "fail": 2}


@dataclass
class Result:
    """One check's verdict. `diverges` is a difference that matches a documented engine's
    behaviour (`behaves_as` names it); `fail` is one that matches none, or breaks a rule no
    engine disputes. With --strict a divergence counts as a failure."""
    check: str                  # the check's name, as --checks takes it
    spec: str                   # the section of docs/spec/ it enforces
    verdict: str = "pass"
    summary: str = ""           # one line: what the server did
    evidence: list[str] = field(default_factory=list)   # requests, response excerpts, numbers
    behaves_as: str | None = None  # "profile llama.cpp", "TGI (§12)": the engine whose documented behaviour it matches

    def note(self, line: str) -> None:
        self.evidence.append(line)

    def flag(self, verdict: str, line: str, behaves_as: str | None = None) -> None:
        """Record a finding; the check's verdict becomes the worst one seen."""
        self.evidence.append(f"**{verdict}**: {line}")
        if SEVERITY[verdict] > SEVERITY[self.verdict]:
            self.verdict = verdict
        if behaves_as and verdict == "diverges" and not self.behaves_as:
            self.behaves_as = behaves_as

    def skip(self, why: str) -> None:
        """Nothing could be checked (the server lacks the feature, or the model gives no case)."""
        self.evidence.append(f"**skipped**: {why}")
        if self.verdict == "pass":
            self.verdict, self.summary = "skipped", why

    def failed(self, strict: bool) -> bool:
        return self.verdict == "fail" or (strict and self.verdict == "diverges")


def markdown(results: list[Result], header: dict) -> str:
    lines = ["# Conformance report", ""]
    lines += [f"- {key}: {value}" for key, value in header.items()]
    lines += ["", "The spec column cites llama-ref's docs/spec/sampling.md and docs/spec/api.md (steps of Part I, "
              "sections § of Part II). A divergence matches a documented engine's behaviour; a failure matches none, "
              "or breaks a rule no engine disputes."]
    lines += ["", "| check | spec | verdict | what the server did |", "|---|---|---|---|"]
    for r in results:
        verdict = r.verdict + (f" (behaves as {r.behaves_as})" if r.behaves_as and r.verdict == "diverges" else "")
        lines.append(f"| [{r.check}](#{r.check}) | {r.spec} | {verdict} | {r.summary.replace('|', '¦')} |")
    for r in results:
        lines += ["", f"## {r.check}", "", f"Spec: {r.spec}. Verdict: **{r.verdict}**.", ""]
        lines += [f"- {line}" for line in r.evidence]
    return "\n".join(lines) + "\n"


def to_json(results: list[Result], header: dict) -> str:
    return json.dumps({"header": header, "results": [asdict(r) for r in results]}, indent=1, ensure_ascii=False)
