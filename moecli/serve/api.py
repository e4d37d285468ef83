"""`moe serve`'s HTTP layer: OpenAI's chat-completions and completions APIs over the scheduler.

    app = create_app(model, tokenizer, scheduler, model_id="bardmoe", api_key=None)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: POST /v1/chat/completions and /v1/completions (a JSON reply, or with `"stream": true`
server-sent events, `data: {chunk}` per piece and `data: [DONE]` at the end), GET /v1/models and
GET /health (the scheduler's counts). A chat request is rendered with the checkpoint's chat template
exactly as `moe chat` renders a conversation (`moecli.inference.text.prompt_ids`, with the same
template variables and stop rules: `chat_reply_format`, `stop_token_ids`); a reasoning model's
reasoning (gpt-oss's analysis channel, `<think>`) goes to `reasoning_content`, the answer to
`content`. A completions prompt is raw text (or token ids), continued as `moe generate
--no-chat-template` does. Every reply carries `usage`, with the prompt tokens the prefix cache
reused as `prompt_tokens_details.cached_tokens`.

Errors are OpenAI's JSON with a 4xx (`openai_errors`): a full queue is a 429, a prompt over the
context a 400 (`context_length_exceeded`), an unknown model a 404 (`model_not_found`), a missing or
wrong key (with `api_key`) a 401 on every endpoint but /health. A client that goes away mid-reply
has its row cancelled (freed at the scheduler's next step).
"""
from __future__ import annotations

import json
import secrets
import time
import uuid

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from moecli.errors import MoecliError
from moecli.inference.conversation import chat_reply_format
from moecli.inference.text import prompt_ids, stop_token_ids
from moecli.serve.openai_errors import APIError, bad_request, error_body, install_error_handlers, log
from moecli.serve.replies import Reply
from moecli.serve.schemas import ChatRequest, CompletionRequest, SamplingRequest
from moecli.text.reasoning import ANSWER, PLAIN, ReasoningFormat, check_effort


class EventStream(StreamingResponse):
    """Server-sent events whose generator is always closed when the response ends, so a client
    that disconnects frees its row at once: Starlette leaves a failed send's generator to the
    garbage collector, and its `finally` (which cancels the row) with it."""

    media_type = "text/event-stream"

    def __init__(self, content):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class Server:
    """What the routes share: the model's tokenizer and config, the scheduler, the served id."""

    def __init__(self, model, tokenizer, scheduler, model_id: str, template_vars: dict | None):
        self.model, self.tokenizer, self.scheduler = model, tokenizer, scheduler
        self.model_id, self.template_vars, self.created = model_id, dict(template_vars or {}), int(time.time())
        self.context = int(getattr(scheduler, "context", None) or model.config.max_position_embeddings)

    def check_model(self, name: str | None) -> None:
        if name and name != self.model_id:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_id!r}",
                           "model", "model_not_found")

    def chat_prompt(self, req: ChatRequest) -> tuple[list[int], ReasoningFormat, tuple[str, ...]]:
        variables = dict(self.template_vars)
        if req.reasoning_effort is not None:
            try:
                variables["reasoning_effort"] = check_effort(req.reasoning_effort)
            except MoecliError as err:
                raise bad_request(str(err), "reasoning_effort") from None
        messages = [m.for_template() for m in req.messages]
        try:
            ids = prompt_ids(self.tokenizer, messages, True, variables)
        except MoecliError as err:  # the template rejected the conversation (say, roles out of order)
            raise bad_request(str(err), "messages") from None
        fmt, extra_stops = chat_reply_format(self.tokenizer)
        return ids, fmt, req.stop_strings() + extra_stops

    def completion_prompt(self, req: CompletionRequest) -> list[int]:
        prompt = req.one_prompt()
        if isinstance(prompt, list):
            vocab = self.model.config.vocab_size
            bad = next((t for t in prompt if not 0 <= t < vocab), None)
            if bad is not None:
                raise bad_request(f"token id {bad} is outside the vocabulary (0..{vocab - 1})", "prompt")
        try:
            return prompt_ids(self.tokenizer, prompt, chat_template=False)
        except MoecliError as err:
            raise bad_request(str(err), "prompt") from None

    def start(self, req: SamplingRequest, ids: list[int], fmt: ReasoningFormat, stops: tuple[str, ...]) -> Reply:
        """Check the request against the context and submit it; 400 / 429 when it cannot run."""
        from moecli.serve.scheduler import QueueFull

        room = self.context - len(ids)
        if room <= 0:
            raise bad_request(f"the prompt has {len(ids)} tokens but the context window is {self.context}; "
                              "shorten it (it is never truncated)", "messages" if isinstance(req, ChatRequest)
                              else "prompt", "context_length_exceeded")
        params = req.sampling(room)
        try:
            return Reply(self.scheduler, self.tokenizer, ids, params, fmt, stops,
                         stop_token_ids(self.tokenizer, self.model.config, fmt.stop_ids))
        except QueueFull:
            raise APIError(429, "the server is busy: every batch row and queue place is taken; retry shortly",
                           code="queue_full") from None
        except MoecliError as err:
            raise bad_request(str(err), code="invalid_value") from None


def create_app(model, tokenizer, scheduler, model_id: str, api_key: str | None = None,
               template_vars: dict | None = None) -> FastAPI:
    """The FastAPI app serving `model` through a started `scheduler` (closing it is the caller's)."""
    server = Server(model, tokenizer, scheduler, model_id, template_vars)

    def authorized(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    app = FastAPI(title="moecli", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    guarded = [Depends(authorized)]

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_id, **server.scheduler.stats()}

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict:
        return {"object": "list", "data": [model_card(server)]}

    @app.get("/v1/models/{name:path}", dependencies=guarded)
    async def one_model(name: str) -> dict:
        server.check_model(name)
        return model_card(server)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(body: ChatRequest, request: Request):
        body.check_supported()
        server.check_model(body.model)
        ids, fmt, stops = server.chat_prompt(body)
        return await respond(server, body, request, server.start(body, ids, fmt, stops), chat=True)

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest, request: Request):
        body.check_supported()
        server.check_model(body.model)
        ids = server.completion_prompt(body)
        return await respond(server, body, request, server.start(body, ids, PLAIN, body.stop_strings()), chat=False)

    return app


def model_card(server: Server) -> dict:
    return {"id": server.model_id, "object": "model", "created": server.created, "owned_by": "moecli",
            "context_length": server.context}


def finish_reason(reason: str) -> str:
    """OpenAI's finish reasons: "length" when a limit cut the reply, else "stop"."""
    return "length" if reason == "length" else "stop"


async def respond(server: Server, req: SamplingRequest, request: Request, reply: Reply, chat: bool):
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": server.model_id}
    if req.stream:
        return EventStream(stream(head, req, request, reply, chat))
    try:
        answer, reasoning = await reply.collect(request.is_disconnected)
    except ConnectionAbortedError:  # the client left; its row is cancelled, and nobody reads an answer
        return Response(status_code=499)
    done = reply.finish
    if done.reason == "error":
        raise APIError(500, f"generation failed: {done.error or 'unknown error'}", code="generation_error")
    if chat:
        message = {"role": "assistant", "content": answer}
        if reasoning:
            message["reasoning_content"] = reasoning
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason(done.reason)}
        return JSONResponse({**head, "object": "chat.completion", "choices": [choice], "usage": done.usage()})
    choice = {"index": 0, "text": answer, "logprobs": None, "finish_reason": finish_reason(done.reason)}
    return JSONResponse({**head, "object": "text_completion", "choices": [choice], "usage": done.usage()})


async def stream(head: dict, req: SamplingRequest, request: Request, reply: Reply, chat: bool):
    """The SSE events of one reply; an error after the first byte is an `error` event, then [DONE]."""
    usage = req.include_usage()
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

    def chunk(delta: dict | None = None, text: str = "", reason: str | None = None) -> dict:
        choice = {"index": 0, **({"delta": delta or {}} if chat else {"text": text}), "logprobs": None,
                  "finish_reason": reason}
        return {**head, "choices": [choice], **({"usage": None} if usage else {})}

    try:
        if chat:
            yield sse(chunk({"role": "assistant", "content": ""}))
        async for kind, text in reply.segments(request.is_disconnected):
            field = "content" if kind == ANSWER else "reasoning_content"
            yield sse(chunk({field: text}, text))
        done = reply.finish
        if done.reason == "error":
            yield sse(error_body(f"generation failed: {done.error or 'unknown error'}", "server_error",
                                 code="generation_error"))
        else:
            yield sse(chunk(reason=finish_reason(done.reason)))
            if usage:
                yield sse({**head, "choices": [], "usage": done.usage()})
        yield sse("[DONE]")
    except ConnectionAbortedError:
        return  # the client left; the row is cancelled
    except Exception as err:  # noqa: BLE001 - the status line is sent: report it in the stream
        log.exception("streaming a reply failed")
        yield sse(error_body(f"internal error: {type(err).__name__}: {err}", "server_error"))
        yield sse("[DONE]")
