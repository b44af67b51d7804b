"""The sampling playground: `GET /playground`, one self-contained page, and the JSON it draws,
`POST /v1/explain` (docs/spec/api.md §6, docs/playground.md). The trace is the one
`generate(..., trace=True)` records; the request is admitted and batched like any other."""
from fastapi import APIRouter, Depends
from fastapi.responses import HTMLResponse

from ..decoding.params import sampling_params
from ..decoding.trace import explanation, playground_page
from .errors import APIError
from .responses import Explanation, declared
from .schemas import ExplainRequest, response_format_params
from .state import ServerState, server_state

router = APIRouter()


@router.get("/playground", response_class=HTMLResponse,
            responses={200: {"description": "the playground page", "content": {"text/html": {}}}})
async def playground():
    return HTMLResponse(playground_page())


@router.post("/v1/explain", responses=declared(Explanation))
async def explain(body: ExplainRequest, server: ServerState = Depends(server_state)):
    model = server.model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "prompt: give exactly one of prompt and messages", "prompt")
    params = sampling_params(body, max_new_tokens=body.max_tokens, **response_format_params(body.response_format))
    if body.messages is not None:
        generation = model.chat([m.model_dump(exclude_none=True) for m in body.messages], params, trace=True,
                                compare_profile=body.compare_profile)
    else:
        generation = model.generate(body.prompt, params, trace=True, compare_profile=body.compare_profile)
    events = [event async for event in server.admitted(generation)]
    return {"model": body.model, **explanation(generation, events, model.tokenizer)}
