"""schemathesis over the server's own OpenAPI schema (docs/reliability.md, "Fuzzing"): every
route, with requests generated from the schema (positive) and just outside it (negative).
Required: no 5xx, every status, content type, header and body as the schema declares it,
and an answer within the client's timeout. Not required: that every schema-valid request
succeeds, since rules that a JSON schema cannot say (the context length, n with streaming,
tools) refuse some with a 400 naming the field.

`FUZZ_EXAMPLES` sets the examples per route and mode (`make fuzz` runs many more); CI
replays the same examples on every run (conftest.py's derandomized profile)."""
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance
from schemathesis.generation import GenerationMode

import llama_ref
from llama_ref.server import ServerSettings, create_app
from test_server import served_checkpoint

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", 8))


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory):
    model = llama_ref.load_model(served_checkpoint(tmp_path_factory.mktemp("fuzz")))
    app = create_app(ServerSettings(served_model_name="tiny", max_batch=4, max_queue=4), model)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def served_model(case):
    """Positive cases ask for the served model, so that they reach generation instead of a 404."""
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = "tiny"
    if case.path_parameters and "model_name" in case.path_parameters:
        case.path_parameters["model_name"] = "tiny"
    return case


def operations(schema, mode: GenerationMode):
    """Each route that takes input, for the negative mode (there is nothing to break in a bare GET)."""
    found = [result.ok() for result in schema.get_all_operations()]
    return [op for op in found if mode == GenerationMode.POSITIVE or op.method == "post"]


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda mode: mode.value)
def test_every_route_answers_as_its_schema_says(api_schema, mode):
    tried = {}
    for operation in operations(api_schema, mode):
        strategy = operation.as_strategy(mode)
        if mode == GenerationMode.POSITIVE:
            strategy = strategy.map(served_model)

        @given(case=strategy)
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case):
            response = case.call_and_validate(timeout=60, excluded_checks=[positive_data_acceptance])
            tried.setdefault(operation.label, []).append(response.status_code)
        run()
    codes = sorted({code for statuses in tried.values() for code in statuses})
    print(f"{mode.value}: {sum(map(len, tried.values()))} requests over {len(tried)} routes; statuses "
          + ", ".join(f"{code} x {sum(s.count(code) for s in tried.values())}" for code in codes))
    assert len(tried) >= (12 if mode == GenerationMode.POSITIVE else 7)
    if mode == GenerationMode.POSITIVE:     # the served model was reached, not only refused
        reached = [label for label, codes in tried.items() if 200 in codes]
        assert len(reached) >= 10, tried
