"""The OpenAI-compatible HTTP API (FastAPI): ``/v1/models``, ``/v1/chat/completions``
and ``/v1/completions``, answered in the shapes the ``openai`` client parses, each
response also carrying the prompt's token ids (``prompt_token_ids``) and each choice its
sampled ids (``token_ids``), as vLLM's ``return_token_ids`` does.

Every request needs an API key (``Authorization: Bearer KEY``): the run's key, or an
episode's key (:class:`Sessions`), whose calls are recorded as that episode's rows
(:mod:`grpo_lab.endpoint.chat`); a key that is unknown or whose episode has finished is
refused. A malformed request gets a 4xx with a message in the API's error shape.

Departures from the OpenAI API, stated: ``n`` must be 1; ``top_logprobs`` (alternatives
per token) is not given; ``tool_choice`` other than ``"none"`` parses tool calls from the
answer but does not constrain generation; a streamed answer comes as one content delta
when it is complete (the backend returns whole completions).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

from ..rollout.backend import Completion, SamplingParams
from ..rollout.conversation import TemplateError
from .chat import CapturedCall, ChatTemplate, EpisodeCapture, MessageError, message_key, template_message, tools_key
from .engine import GenerationQueue
from .tools import ParsedAnswer, ToolParser


class APIError(Exception):
    """An error answered in the OpenAI API's shape."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


@dataclass
class ServeSettings:
    """What the endpoint serves and allows.

    ``max_tokens``: a call's default and largest ``max_tokens`` (the run's generation
    budget); ``max_context``: prompt and answer together (``None``: no bound);
    ``fixed_sampling``: answer at ``temperature`` and ``top_p`` whatever a request asks
    (a training run: its log-probs are taken at these), else they are the defaults.
    ``roles``: the names by which a multi-agent system addresses the roles of the run in
    a request's ``model`` (role 0, the main agent, first; ``model`` addresses role 0 too);
    every call is recorded with its role."""

    model: str
    max_tokens: int
    max_context: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    fixed_sampling: bool = False
    roles: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.model in self.roles[1:]:
            raise ValueError(f"roles={list(self.roles)}: the served model {self.model!r} addresses role 0, so it can "
                             "only be the first role")

    def role_of(self, name: str) -> int | None:
        """The role a request's ``model`` addresses (``None``: no model of this endpoint);
        the served model is role 0."""
        if name == self.model:
            return 0
        return self.roles.index(name) if name in self.roles else None

    @property
    def model_names(self) -> list[str]:
        return [self.model, *(r for r in self.roles if r != self.model)]


class Sessions:
    """API keys: the run's own key (served, not recorded) and one key per episode, whose
    calls are recorded in its :class:`~grpo_lab.endpoint.chat.EpisodeCapture` until it is
    closed. Safe to use from any thread."""

    def __init__(self, run_key: str | None = None) -> None:
        self.run_key = run_key or "sk-run-" + secrets.token_hex(16)
        self._open: dict[str, EpisodeCapture] = {}
        self._closed: set[str] = set()
        self._lock = threading.Lock()

    def open(self) -> str:
        """A new episode's key."""
        key = "sk-episode-" + secrets.token_hex(16)
        with self._lock:
            self._open[key] = EpisodeCapture()
        return key

    def close(self, key: str) -> EpisodeCapture:
        """End the episode of ``key`` (its later requests are refused); its calls."""
        with self._lock:
            capture = self._open.pop(key)
            self._closed.add(key)
        return capture

    def capture_of(self, key: str | None) -> EpisodeCapture | None:
        """The episode a request with ``key`` belongs to (``None``: the run's key);
        :class:`APIError` 401 for a key that is unknown or whose episode has finished."""
        if key is not None and secrets.compare_digest(key, self.run_key):
            return None
        with self._lock:
            if key in self._open:
                return self._open[key]
            if key in self._closed:
                raise APIError(401, "this episode has finished: its key no longer calls the model",
                               code="episode_finished")
        raise APIError(401, "invalid API key: use the run's key or an open episode's key", code="invalid_api_key")


class SamplingRequest(BaseModel):
    """What both completion endpoints take (fields the API has and this endpoint does not
    read are accepted and ignored)."""

    model_config = ConfigDict(extra="allow")

    model: str
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = None
    seed: int | None = None


class ChatRequest(SamplingRequest):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = None


@dataclass
class ServeStats:
    """What the endpoint counted: requests answered and refused, tool calls parsed, and
    answers whose tool call did not parse (returned as plain content)."""

    requests: int = 0
    refused: int = 0
    tool_calls: int = 0
    malformed_tool_calls: int = 0


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else list(stop)
    if any(not s for s in stops):
        raise APIError(400, "stop strings must not be empty", param="stop")
    return tuple(stops)


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    """``text`` up to its first stop string (the API does not return the stop string)."""
    cuts = [k for k in (text.find(s) for s in stops) if k >= 0]
    return text[: min(cuts)] if cuts else text


class Service:
    """What the routes do: check the key and the model, render, generate through the
    queue, parse tool calls, record the call in its episode, answer in the API's shape."""

    def __init__(self, queue: GenerationQueue, tokenizer, settings: ServeSettings, sessions: Sessions,
                 tool_parser: ToolParser) -> None:
        self.queue, self.tokenizer, self.settings, self.sessions = queue, tokenizer, settings, sessions
        self.tool_parser = tool_parser
        self.stats = ServeStats()
        self.version = 0  # of the weights being served: 0 as loaded, then each push's
        self.weight_group = None
        self.template: ChatTemplate | None = None
        self.template_error = ""
        try:
            self.template = ChatTemplate(tokenizer)
        except TemplateError as err:
            self.template_error = str(err)

    def authorize(self, request: Request) -> EpisodeCapture | None:
        """The episode the request's key belongs to (``None``: the run's key)."""
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header.lower().startswith("bearer ") else None
        if not key:
            raise APIError(401, "missing API key (Authorization: Bearer KEY)", code="invalid_api_key")
        return self.sessions.capture_of(key)

    def check_model(self, name: str) -> int:
        """The role the request's ``model`` addresses (0 for the served model); 404 naming
        the valid names otherwise."""
        role = self.settings.role_of(name)
        if role is None:
            served = self.settings.model_names
            raise APIError(404, f"the model {name!r} does not exist: this endpoint serves "
                           f"{served[0]!r}" + (f" and the roles {served[1:]}" if len(served) > 1 else ""),
                           code="model_not_found", param="model")
        return role

    def sampling(self, req: SamplingRequest, prompt_len: int, requested: int | None,
                 stops: tuple[str, ...]) -> SamplingParams:
        """The request's sampling, its answer capped by the server's budget and the
        context left after the prompt."""
        settings = self.settings
        if req.n not in (None, 1):
            raise APIError(400, f"n={req.n}: this endpoint returns one choice per request (n=1)", param="n")
        left = None if settings.max_context is None else settings.max_context - prompt_len
        if left is not None and left < 1:
            raise APIError(400, f"This model's maximum context length is {settings.max_context} tokens. However, "
                           f"your messages resulted in {prompt_len} tokens. Please reduce the length of the messages.",
                           code="context_length_exceeded", param="messages")
        if requested is not None and requested < 1:
            raise APIError(400, f"max_tokens={requested} must be at least 1", param="max_tokens")
        limit = min(x for x in (requested, settings.max_tokens, left) if x is not None)
        temperature, top_p = settings.temperature, settings.top_p
        if not settings.fixed_sampling:
            temperature = settings.temperature if req.temperature is None else req.temperature
            top_p = settings.top_p if req.top_p is None else req.top_p
        try:
            return SamplingParams(max_tokens=limit, temperature=temperature, top_p=top_p, stop=stops, seed=req.seed)
        except ValueError as err:
            raise APIError(400, str(err)) from None

    async def generate(self, prompt: list[int], params: SamplingParams) -> Completion:
        try:
            return await self.queue.generate(prompt, params)
        except RuntimeError as err:
            raise APIError(503, str(err), kind="server_error") from None

    def version_of(self, completion: Completion) -> int:
        """The policy version that generated ``completion`` (its backend's stamp, else the
        version served now)."""
        return completion.version if completion.version is not None else self.version

    def text(self, completion: Completion, stops: tuple[str, ...]) -> str:
        return cut_at_stop(self.tokenizer.decode(completion.token_ids, skip_special_tokens=True), stops)

    def chat_prompt(self, req: ChatRequest, capture: EpisodeCapture | None, role: int = 0
                    ) -> tuple[list[int], bool, tuple, CapturedCall | None]:
        """The prompt ids of a chat request (extending the episode's call of the same role
        whose conversation it continues, where it can), whether they extend it, the
        messages' keys, and the call it continues."""
        if self.template is None:
            raise APIError(400, self.template_error)
        if req.top_logprobs:
            raise APIError(400, "top_logprobs is not supported (each token's own log-prob is: logprobs=true)",
                           param="top_logprobs")
        if not req.messages:
            raise APIError(400, "messages must not be empty", param="messages")
        try:
            messages = [template_message(m) for m in req.messages]
            if capture is not None:
                return capture.prompt_for(self.template, messages, req.tools, role)
            return self.template.prompt_ids(messages, req.tools), False, (), None
        except MessageError as err:
            raise APIError(400, str(err), param="messages") from None

    def answer(self, req: ChatRequest, text: str) -> tuple[dict[str, Any], bool]:
        """The assistant message of ``text`` (its tool calls parsed when the request
        offers tools), and whether it calls tools."""
        parsed = ParsedAnswer(text)
        if req.tools and req.tool_choice != "none":
            parsed = self.tool_parser(text)
            self.stats.malformed_tool_calls += parsed.malformed
            self.stats.tool_calls += len(parsed.calls)
        calls = [{"id": "call_" + secrets.token_hex(12), "type": "function",
                  "function": {"name": c.name, "arguments": json.dumps(c.arguments)}} for c in parsed.calls]
        message: dict[str, Any] = {"role": "assistant", "content": parsed.content if parsed.content or not calls
                                   else None}
        if calls:
            message["tool_calls"] = calls
        return message, bool(calls)

    async def chat(self, req: ChatRequest, request: Request) -> dict:
        capture = self.authorize(request)
        role = self.check_model(req.model)
        prompt, extends, keys, continued = self.chat_prompt(req, capture, role)
        stops = stop_strings(req.stop)
        completion = await self.generate(prompt, self.sampling(req, len(prompt), req.max_completion_tokens or req.max_tokens,
                                                               stops))
        version = self.version_of(completion)
        message, calls_tools = self.answer(req, self.text(completion, stops))
        if capture is not None:
            capture.record(CapturedCall(keys, tools_key(req.tools), prompt, completion,
                                        message_key(template_message(message)), extends, role=role,
                                        invocation=continued.invocation if continued is not None else -1))
        self.stats.requests += 1
        choice = {"index": 0, "message": message, "finish_reason": "tool_calls" if calls_tools else completion.finish_reason,
                  "logprobs": chat_logprobs(self.tokenizer, completion) if req.logprobs else None,
                  "token_ids": list(completion.token_ids)}
        return {"id": "chatcmpl-" + secrets.token_hex(12), "object": "chat.completion", "created": int(time.time()),
                "model": self.settings.model, "choices": [choice], "usage": usage(prompt, completion),
                "prompt_token_ids": prompt, "weight_version": version}

    async def complete(self, req: CompletionRequest, request: Request) -> dict:
        capture = self.authorize(request)
        role = self.check_model(req.model)
        prompt = completion_prompt(self.tokenizer, req.prompt)
        stops = stop_strings(req.stop)
        if req.logprobs and req.logprobs > 1:
            raise APIError(400, f"logprobs={req.logprobs}: only the sampled token's log-prob is given (logprobs=1)",
                           param="logprobs")
        completion = await self.generate(prompt, self.sampling(req, len(prompt), req.max_tokens, stops))
        version = self.version_of(completion)
        text = self.text(completion, stops)
        if capture is not None:
            continued = capture.continued_by_tokens(prompt, role)
            capture.record(CapturedCall((("prompt", tuple(prompt)),), "", prompt, completion, ("completion", text),
                                        False, role=role,
                                        invocation=continued.invocation if continued is not None else -1))
        self.stats.requests += 1
        choice = {"index": 0, "text": text, "finish_reason": completion.finish_reason,
                  "logprobs": text_logprobs(self.tokenizer, completion) if req.logprobs else None,
                  "token_ids": list(completion.token_ids)}
        return {"id": "cmpl-" + secrets.token_hex(12), "object": "text_completion", "created": int(time.time()),
                "model": self.settings.model, "choices": [choice], "usage": usage(prompt, completion),
                "prompt_token_ids": prompt, "weight_version": version}

    def trainer_only(self, request: Request) -> None:
        if self.authorize(request) is not None:
            raise APIError(403, "an episode's key cannot change the weights: use the run's key", code="forbidden")

    async def connect_weights(self, body: dict, request: Request) -> dict:
        """Join the trainer's weight group (rank ``body["rank"]`` of ``body["world"]``)."""
        from ..rollout.backends.weight_stream import weight_group

        self.trainer_only(request)
        try:
            host, port, rank, world = str(body["host"]), int(body["port"]), int(body["rank"]), int(body["world"])
        except (KeyError, TypeError, ValueError):
            raise APIError(400, "weights/connect needs host, port, rank and world") from None
        self.weight_group = await asyncio.to_thread(weight_group, host, port, rank, world)
        return {"rank": rank, "version": self.version}

    async def update_weights(self, body: dict, request: Request) -> dict:
        """Receive the trainer's broadcast of the weights of version ``body["version"]``,
        holding new requests back while they load; ``body["interrupt"]``: generations in
        flight end first with ``finish_reason="abort"`` (partial rollouts), else they
        finish on the old weights."""
        from ..rollout.backends.weight_stream import adapter_config, receive_tensors

        self.trainer_only(request)
        if self.weight_group is None:
            raise APIError(409, "no weight group: call weights/connect first")
        version = int(body.get("version", self.version + 1))
        interrupt = bool(body.get("interrupt", False))
        try:
            adapter = adapter_config(body["adapter"]) if body.get("adapter") else None
        except (TypeError, ValueError) as err:
            raise APIError(400, f"weights/update: the adapter's config is not a LoRA config: {err}") from None

        def receive() -> None:
            with self.queue.paused(interrupt):
                if adapter is not None:  # a LoRA adapter's tensors only: the base weights stay
                    self.queue.backend.load_adapter(dict(receive_tensors(self.weight_group)), adapter, version=version)
                else:
                    self.queue.backend.load_weights(receive_tensors(self.weight_group), version=version)
                self.version = version

        await asyncio.to_thread(receive)
        return {"version": self.version}


def usage(prompt: list[int], completion: Completion) -> dict[str, int]:
    return {"prompt_tokens": len(prompt), "completion_tokens": len(completion.token_ids),
            "total_tokens": len(prompt) + len(completion.token_ids)}


def create_app(queue: GenerationQueue, tokenizer, settings: ServeSettings, sessions: Sessions,
               tool_parser: ToolParser) -> FastAPI:
    """The endpoint's ASGI app: requests generated through ``queue``, rendered with
    ``tokenizer``'s chat template, tool calls parsed by ``tool_parser``."""
    service = Service(queue, tokenizer, settings, sessions, tool_parser)
    app = FastAPI(title="grpo_lab endpoint", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service, app.state.stats, app.state.settings = service, service.stats, settings

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        service.stats.refused += 1
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
        service.stats.refused += 1
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}"
                             for e in err.errors()[:5])
        return APIError(400, f"malformed request: {problems}").response()

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        service.authorize(request)
        return {"object": "list", "data": [{"id": name, "object": "model", "created": int(time.time()),
                                            "owned_by": "grpo_lab"} for name in settings.model_names]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        body = await service.chat(req, request)
        return StreamingResponse(chat_chunks(body, req), media_type="text/event-stream") if req.stream else body

    @app.get("/v1/weights")
    async def weights(request: Request) -> dict:
        service.authorize(request)
        return {"version": service.version}

    @app.post("/v1/weights/connect")
    async def connect_weights(body: dict, request: Request) -> dict:
        return await service.connect_weights(body, request)

    @app.post("/v1/weights/update")
    async def update_weights(body: dict, request: Request) -> dict:
        return await service.update_weights(body, request)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        body = await service.complete(req, request)
        return StreamingResponse(text_chunks(body), media_type="text/event-stream") if req.stream else body

    return app


def completion_prompt(tokenizer, prompt: str | list) -> list[int]:
    """A completions request's prompt as token ids: a string (tokenized as the tokenizer
    does by default), token ids, or a list holding one of either."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        return list(tokenizer(prompt)["input_ids"])
    if prompt and all(isinstance(t, int) for t in prompt):
        vocab = len(tokenizer)
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"prompt token ids out of the vocabulary [0, {vocab}): {bad[:5]}", param="prompt")
        return list(prompt)
    raise APIError(400, "prompt must be a non-empty string or token ids (one prompt per request)", param="prompt")


def token_strings(tokenizer, completion: Completion) -> list[str]:
    return [tokenizer.decode([t]) for t in completion.token_ids]


def chat_logprobs(tokenizer, completion: Completion) -> dict:
    return {"content": [{"token": s, "logprob": lp, "bytes": list(s.encode()), "top_logprobs": []}
                        for s, lp in zip(token_strings(tokenizer, completion), completion.logprobs)]}


def text_logprobs(tokenizer, completion: Completion) -> dict:
    tokens = token_strings(tokenizer, completion)
    offsets, at = [], 0
    for s in tokens:
        offsets.append(at)
        at += len(s)
    return {"tokens": tokens, "token_logprobs": list(completion.logprobs), "top_logprobs": None, "text_offset": offsets}


def sse(payload: dict | Literal["[DONE]"]) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


async def chat_chunks(body: dict, req: ChatRequest):
    """A complete chat answer as server-sent chunks: the role, the content (or the tool
    calls), the finish reason, usage when asked, then ``[DONE]``."""
    choice = body["choices"][0]
    message = choice["message"]
    head = {k: body[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    yield sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
               "prompt_token_ids": body["prompt_token_ids"]})
    delta: dict[str, Any] = {}
    if message.get("content"):
        delta["content"] = message["content"]
    if message.get("tool_calls"):
        delta["tool_calls"] = [{"index": i, **call} for i, call in enumerate(message["tool_calls"])]
    yield sse({**head, "choices": [{"index": 0, "delta": delta, "logprobs": choice["logprobs"], "finish_reason": None,
                                    "token_ids": choice["token_ids"]}]})
    yield sse({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}]})
    options = getattr(req, "stream_options", None) or {}
    if isinstance(options, dict) and options.get("include_usage"):
        yield sse({**head, "choices": [], "usage": body["usage"]})
    yield sse("[DONE]")


async def text_chunks(body: dict):
    choice = body["choices"][0]
    head = {k: body[k] for k in ("id", "created", "model")} | {"object": "text_completion"}
    yield sse({**head, "choices": [{**choice, "finish_reason": None}], "prompt_token_ids": body["prompt_token_ids"]})
    yield sse({**head, "choices": [{"index": 0, "text": "", "finish_reason": choice["finish_reason"],
                                    "logprobs": None}]})
    yield sse("[DONE]")
