"""The conformance kit against our own server: the unchanged server passes every check under
--strict, and each of a dozen deliberately wrong servers (our app with one semantic change)
is caught by the check that owns the rule it breaks.

A mutation changes the server only: it acts on the server's scheduler thread (or in code
only the server runs), so the kit's oracle, in the same process, keeps the reference semantics.
"""
import json
import subprocess
import sys
import threading
from dataclasses import replace

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

import llama_ref
from llama_ref import conform
from llama_ref.decoding import generation, sampling, stopping
from llama_ref.nn.ops import softmax
from llama_ref.server import errors, state
from test_server import ThreadServer, served_checkpoint

SAMPLES = 40   # draws per sampling setting: enough for these mutations, a fifth of a real run


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{"plain": the served tiny model, "eos": the same with EOS's output row tripled, so that
    short chats end on EOS and special tokens get streamed (too often for the penalties check
    to tell its alternatives apart in the plain model's place)}, each with its oracle."""
    plain = served_checkpoint(tmp_path_factory.mktemp("conform"))
    eos = tmp_path_factory.mktemp("conform_eos")
    served_checkpoint(eos)
    weights = load_file(eos / "model.safetensors")
    weights["lm_head.weight"][2] *= 3.0
    save_file(weights, eos / "model.safetensors", metadata={"format": "pt"})
    return {name: (path, conform.Oracle(llama_ref.load_model(path))) for name, path in (("plain", plain), ("eos", eos))}


def run_kit(model, checks=None) -> dict:
    path, oracle = model
    server = ThreadServer(llama_ref.load_model(path))
    try:
        kit = conform.Kit(conform.Target(server.url, "tiny"), oracle, samples=SAMPLES)
        results = conform.run(kit, checks, progress=False)
    finally:
        server.stop(check=False)
    return {r.check: r for r in results}


def on_server(wrong, right):
    """`wrong` on the server's scheduler thread, `right` everywhere else (the oracle)."""
    def choose(*args, **kwargs):
        chosen = wrong if threading.current_thread().name == "scheduler" else right
        return chosen(*args, **kwargs)
    return choose


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    """The kit run against our server on the plain model with the oracle recorded: (the
    vectors' directory, the run's results by check)."""
    path, oracle = models["plain"]
    directory = tmp_path_factory.mktemp("vectors")
    _, results = conform.vectors.export(str(path), directory, SAMPLES, 1234, oracle.model, llama_ref.load_model(path))
    return directory, {r.check: r for r in results}


@pytest.mark.parametrize("model", ["plain", "eos"])
def test_our_server_passes_every_check_strictly(model, models, exported):
    results = exported[1] if model == "plain" else run_kit(models[model])
    assert list(results) == list(conform.CHECKS)
    failed = {name: (r.verdict, r.evidence) for name, r in results.items() if r.failed(strict=True)}
    assert not failed
    assert all(r.verdict == "pass" for r in results.values()), {n: r.evidence for n, r in results.items()}
    exercised = not any("not exercised" in line for line in results["streaming"].evidence)
    assert exercised == (model == "eos")   # the eos model's responses end on EOS, streamed as no content


def top_p_inclusive(logits, p):
    """Meta's rule: keep an id when the mass before it is <= p (one more id at equality)."""
    if p >= 1.0:
        return logits
    probs = softmax(logits)
    order = np.lexsort((np.arange(logits.size), -probs))
    mass_before = np.cumsum(probs[order]) - probs[order]
    keep = np.zeros(logits.size, dtype=bool)
    keep[order[mass_before <= p]] = True
    return np.where(keep, logits, -np.inf)


def min_p_before_temperature(params, history):
    """The pipeline with min_p moved in front of temperature (computed at temperature 1)."""
    penalties, filters = ORIGINAL["pipeline"](params, history)
    by_name = {stage.name: stage for stage in filters}
    return penalties, [by_name["min_p"], by_name["temperature"], by_name["top_k"], by_name["top_p"]]


def special_as_content(event):
    """A special token's piece ("</s>") added to the response text, as a detokenizer that
    does not skip special tokens would."""
    return replace(event, delta=event.delta + event.text) if event.special else event


def usage_off_by_one(original):
    def usage(self, result):
        return {**original(self, result), "prompt_tokens": result.prompt_tokens + 1}
    return usage


async def server_error(request, err):
    return errors.JSONResponse({"error": {"message": "boom"}}, status_code=500)


# name -> (how to break the server, the check that owns the rule, {other check: why it fails too}, model)
MUTATIONS = {
    "top_k off by one": (
        lambda mp: mp.setattr(sampling, "top_k_filter",
                              on_server(lambda z, k: ORIGINAL["top_k_filter"](z, k + 1), ORIGINAL["top_k_filter"])),
        "sampling", {"logprobs": "its top_k 3 request reports a fourth top_logprobs entry"}, "plain"),
    "top_p inclusive": (
        lambda mp: mp.setattr(sampling, "top_p_filter", on_server(top_p_inclusive, ORIGINAL["top_p_filter"])),
        "sampling", {}, "plain"),
    "min_p before temperature": (
        lambda mp: mp.setattr(sampling, "pipeline", on_server(min_p_before_temperature, ORIGINAL["pipeline"])),
        "sampling", {}, "plain"),
    "frequency penalty once per distinct token": (
        lambda mp: mp.setattr(sampling, "apply_frequency_presence_penalties", on_server(
            lambda z, counts, f, p: ORIGINAL["apply_frequency_presence_penalties"](z, (counts > 0).astype(int), f, p),
            ORIGINAL["apply_frequency_presence_penalties"])),
        "penalties", {}, "plain"),
    "presence penalty with the wrong sign": (
        lambda mp: mp.setattr(sampling, "apply_frequency_presence_penalties", on_server(
            lambda z, counts, f, p: ORIGINAL["apply_frequency_presence_penalties"](z, counts, f, -p),
            ORIGINAL["apply_frequency_presence_penalties"])),
        "penalties", {}, "plain"),
    "stop not stripped": (
        lambda mp: mp.setattr(stopping, "find_stop", on_server(
            lambda text, stops, new: None if (cut := ORIGINAL["find_stop"](text, stops, new)) is None else
            cut + len(next(s for s in stops if text.startswith(s, cut))), ORIGINAL["find_stop"])),
        "stop", {}, "plain"),
    "stop leaked while streaming": (
        lambda mp: mp.setattr(stopping, "stop_prefix_length", on_server(lambda text, stops: 0,
                                                                         ORIGINAL["stop_prefix_length"])),
        "stop", {}, "plain"),
    "special token streamed as content": (
        lambda mp: mp.setattr(generation.Response, "step", on_server(
            lambda self, logits: special_as_content(ORIGINAL["step"](self, logits)), ORIGINAL["step"])),
        "streaming", {"greedy": "whole responses end in '</s>' too, so greedy texts differ from the oracle's",
                      "penalties": "for the same reason as greedy",
                      "json_mode": "'</s>' after the object is not JSON"}, "eos"),
    "usage off by one": (
        lambda mp: mp.setattr(state.ServerState, "usage", usage_off_by_one(state.ServerState.usage)),
        "tokenization", {}, "plain"),
    "500 on a bad parameter": (
        lambda mp: mp.setattr(errors, "validation_error", server_error),
        "limits", {}, "plain"),
}
ORIGINAL = {name: getattr(sampling, name) for name in
            ("top_k_filter", "top_p_filter", "pipeline", "apply_frequency_presence_penalties")}
ORIGINAL.update(find_stop=stopping.find_stop, stop_prefix_length=stopping.stop_prefix_length,
                step=generation.Response.step)


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_a_wrong_server_is_caught_by_the_check_that_owns_the_rule(mutation, models, monkeypatch):
    break_server, owner, others, model = MUTATIONS[mutation]
    break_server(monkeypatch)
    results = run_kit(models[model])
    flagged = {name for name, r in results.items() if r.failed(strict=True)}
    assert owner in flagged, results[owner].evidence
    assert flagged - {owner} == set(others), {name: results[name].evidence for name in flagged - {owner}}


def test_a_check_asked_alone_runs_the_check_it_needs_first(models):
    """penalties reads the server's arithmetic, which greedy measures: asked alone it still
    gets it (run() adds greedy, in the registry's order)."""
    results = run_kit(models["plain"], ["penalties"])
    assert list(results) == ["greedy", "penalties"]
    assert all(r.verdict == "pass" for r in results.values()), {n: r.evidence for n, r in results.items()}
    assert any("differ from the oracle's by up to" in line for line in results["greedy"].evidence)


def run_replayed(path, directory) -> dict:
    oracle, header = conform.vectors.load(directory)
    server = ThreadServer(llama_ref.load_model(path))
    try:
        kit = conform.Kit(conform.Target(server.url, "tiny"), oracle, samples=header["samples"], seed=header["seed"])
        return {r.check: r for r in conform.run(kit, progress=False)}
    finally:
        server.stop(check=False)


def test_vectors_replay_the_oracle_without_the_model(models, exported, monkeypatch):
    """Against the same server the vectors give every verdict the model gave; against a wrong
    server they catch it as the model does, asking nothing the export did not record."""
    path, _ = models["plain"]
    assert {r.verdict for r in run_replayed(path, exported[0]).values()} == {"pass"}
    MUTATIONS["top_k off by one"][0](monkeypatch)
    flagged = {name for name, r in run_replayed(path, exported[0]).items() if r.failed(strict=True)}
    assert flagged == {"sampling", "logprobs"}


def test_vectors_name_a_question_they_cannot_answer(exported):
    oracle, _ = conform.vectors.load(exported[0])
    with pytest.raises(conform.vectors.VectorsError, match="no answer to completion_ids"):
        oracle.completion_ids("a prompt no check sends")


def conform_cli(url, path, cwd, *args):
    return subprocess.run([sys.executable, "-m", "llama_ref.cli", "conform", "--base-url", url, "--model", str(path),
                           "--served-model", "tiny", "--quiet", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def test_the_command_line_reports_and_sets_the_exit_status(models, tmp_path, monkeypatch):
    """`llama-ref conform` writes the report and the JSON, exits 0 when the checks pass and 1
    when one fails, and refuses an unknown check by name."""
    path, _ = models["plain"]
    server = ThreadServer(llama_ref.load_model(path))
    try:
        ok = conform_cli(server.url, path, tmp_path, "--checks", "tokenization,limits", "--report", "r.md",
                         "--json", "r.json")
        assert ok.returncode == 0, ok.stderr
        assert [r["verdict"] for r in json.loads((tmp_path / "r.json").read_text())["results"]] == ["pass", "pass"]
        assert "| [limits](#limits) |" in (tmp_path / "r.md").read_text()
        bad = conform_cli(server.url, path, tmp_path, "--checks", "tokenization,nonsense")
        assert bad.returncode == 2 and "--checks: unknown nonsense" in bad.stderr
        monkeypatch.setattr(state.ServerState, "usage", usage_off_by_one(state.ServerState.usage))
        failed = conform_cli(server.url, path, tmp_path, "--checks", "tokenization")
        assert failed.returncode == 1 and "failed: tokenization" in failed.stdout
    finally:
        server.stop(check=False)
