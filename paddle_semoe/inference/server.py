"""An OpenAI-compatible HTTP endpoint over the batching engine (stdlib only).

Routes::

    POST /v1/completions         prompt -> text   (stream: server-sent events, then [DONE])
    POST /v1/chat/completions    messages -> assistant message (stream as chat.completion.chunk)
    GET  /v1/models              the served model
    GET  /health                 {"status": "ok" | "draining", "in_flight": n}

Every request's generation runs on the one :class:`GenerationEngine` thread, so concurrent
requests share decode steps (and expert loads). Errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status: bad JSON or
fields (400), unknown model (404), body too large (413), too many concurrent requests (429),
shutting down (503). A client that disconnects mid-stream has its sequence cancelled; the
server keeps serving. :meth:`CompletionServer.shutdown` stops admitting requests, lets the ones
in flight finish (their responses are written completely), then stops.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Generator

from paddle_semoe.inference.scheduler import GenerationEngine, SamplingParams, Sequence, Tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerLimits:
    """Request limits.

    Attributes:
        max_prompt_tokens: longest accepted prompt (tokens).
        max_tokens: largest accepted ``max_tokens``.
        max_concurrent: requests being generated at once; more get 429.
        max_body_bytes: largest accepted request body.
        default_max_tokens: ``max_tokens`` when a request gives none.
    """

    max_prompt_tokens: int = 1024
    max_tokens: int = 256
    max_concurrent: int = 16
    max_body_bytes: int = 1 << 20
    default_max_tokens: int = 16

    def __post_init__(self) -> None:
        for name in ("max_prompt_tokens", "max_tokens", "max_concurrent", "max_body_bytes", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServerLimits.{name} must be >= 1, got {getattr(self, name)}")


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def chat_prompt(messages: list[dict]) -> str:
    """The plain chat template: one ``role: content`` line per message, then ``assistant:``."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


# ----------------------------------------------------------------------------- request parsing
def _field(body: dict, name: str, types: tuple[type, ...], default: Any = None, *, required: bool = False) -> Any:
    if name not in body or body[name] is None:
        if required:
            raise APIError(400, f"missing required parameter '{name}'", param=name, code="missing_required_parameter")
        return default
    v = body[name]
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
        raise APIError(400, f"'{name}' must be {' or '.join(t.__name__ for t in types)}, got {type(v).__name__}", param=name)
    return v


@dataclass
class _Request:
    chat: bool
    prompt_ids: list[int]
    params: SamplingParams
    stops: list[str]
    stream: bool
    include_usage: bool


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins the handler threads: in-flight responses finish
    block_on_close = True
    app: "CompletionServer"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.conns: set["_Handler"] = set()
        self.conns_lock = threading.Lock()

    def close_idle(self) -> None:
        """End keep-alive connections that wait for a next request (not those mid-request)."""
        with self.conns_lock:
            for h in list(self.conns):
                if not h.busy:
                    with contextlib.suppress(OSError):
                        h.connection.shutdown(socket.SHUT_RDWR)


class CompletionServer:
    """Serves one model through a :class:`GenerationEngine` on ``host:port`` (port 0: any free).

    Args:
        engine: the started engine.
        tokenizer: encode/decode (the package's tokenizer).
        model_name: the id clients must send as ``model``.
        max_seq_len: the model's context length (prompt + max_tokens must fit).
        stop_ids: token ids that end generation (the tokenizer's EOS).
    """

    def __init__(self, engine: GenerationEngine, tokenizer: Tokenizer, model_name: str, max_seq_len: int,
                 limits: ServerLimits = ServerLimits(), host: str = "127.0.0.1", port: int = 0,
                 stop_ids: tuple[int, ...] = ()):
        self.engine = engine
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_seq_len = max_seq_len
        self.limits = limits
        self.stop_ids = stop_ids
        self.created = int(time.time())
        self._slots = threading.BoundedSemaphore(limits.max_concurrent)
        self._draining = False
        self.httpd = _Server((host, port), _Handler)
        self.httpd.app = self
        self._thread: threading.Thread | None = None
        self.requests_served = 0

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        host = self.httpd.server_address[0]
        return f"http://{host.decode() if isinstance(host, bytes) else host}:{self.port}"

    def start(self) -> "CompletionServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="http-server", daemon=True)
        self._thread.start()
        logger.info("serving %s on %s", self.model_name, self.url)
        return self

    def shutdown(self, timeout: float | None = None) -> None:
        """Refuse new requests (503), finish the ones in flight, then stop the server."""
        self._draining = True
        self.engine.shutdown(drain=True, timeout=timeout)
        self.httpd.shutdown()  # stop accepting connections
        self.httpd.close_idle()
        self.httpd.server_close()  # joins the handler threads: their responses are complete
        if self._thread is not None:
            self._thread.join(timeout)
        logger.info("server stopped after %d requests", self.requests_served)

    # -- request handling (handler threads) ------------------------------------------------
    def parse(self, body: dict, chat: bool) -> _Request:
        model = _field(body, "model", (str,), required=True)
        if model != self.model_name:
            raise APIError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")
        if chat:
            messages = _field(body, "messages", (list,), required=True)
            if not messages:
                raise APIError(400, "'messages' must contain at least one message", param="messages")
            for i, m in enumerate(messages):
                if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise APIError(400, f"messages[{i}] must be an object with string 'role' and 'content'", param="messages")
            text = chat_prompt(messages)
        else:
            text = _field(body, "prompt", (str, list), required=True)
            if isinstance(text, list):
                if len(text) != 1 or not isinstance(text[0], str):
                    raise APIError(400, "'prompt' must be a string or a list of exactly one string", param="prompt")
                text = text[0]
        n = _field(body, "n", (int,), 1)
        if n != 1:
            raise APIError(400, f"only n=1 is supported, got n={n}", param="n")
        key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
        max_tokens = _field(body, key, (int,), self.limits.default_max_tokens)
        if not 1 <= max_tokens <= self.limits.max_tokens:
            raise APIError(400, f"'{key}' must be in [1, {self.limits.max_tokens}], got {max_tokens}", param=key)
        temperature = float(_field(body, "temperature", (int, float), 1.0))
        if not 0.0 <= temperature <= 2.0:
            raise APIError(400, f"'temperature' must be in [0, 2], got {temperature}", param="temperature")
        top_k = _field(body, "top_k", (int,), 0)
        if top_k < 0:
            raise APIError(400, f"'top_k' must be >= 0, got {top_k}", param="top_k")
        seed = _field(body, "seed", (int,), None)
        stop = _field(body, "stop", (str, list), [])
        stops = [stop] if isinstance(stop, str) else list(stop)
        if len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
            raise APIError(400, "'stop' must be a non-empty string or a list of at most 4 of them", param="stop")
        stream = _field(body, "stream", (bool,), False)
        opts = _field(body, "stream_options", (dict,), {}) or {}
        ids = self.tokenizer.encode(text)
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt" if not chat else "messages")
        if len(ids) > self.limits.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens, more than the limit of {self.limits.max_prompt_tokens}",
                           param="messages" if chat else "prompt", code="prompt_too_long")
        if len(ids) + max_tokens > self.max_seq_len:
            raise APIError(400, f"This model's maximum context length is {self.max_seq_len} tokens. However, you requested "
                                f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} for the completion).",
                           param=key, code="context_length_exceeded")
        params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                seed=seed if seed is not None else uuid.uuid4().int & 0xFFFFFFFF, stop_ids=self.stop_ids)
        return _Request(chat, ids, params, stops, bool(stream), bool(opts.get("include_usage")))

    def generate(self, req: _Request) -> Generator[tuple[str, str | None, Sequence], None, None]:
        """Yields ``(text delta, finish_reason or None, sequence)``; the last has a finish reason.

        Text is decoded from all tokens so far (multi-byte characters are complete before they
        are sent) and held back while it could still be the start of a stop string."""
        if self._draining or not self.engine.accepting:
            raise APIError(503, "the server is shutting down", type_="server_error", code="shutting_down")
        if not self._slots.acquire(blocking=False):
            raise APIError(429, f"too many concurrent requests (limit {self.limits.max_concurrent}); retry later",
                           type_="rate_limit_error", code="rate_limit_exceeded")
        try:
            events: queue.Queue[int | None] = queue.Queue()
            try:
                seq = self.engine.submit(req.prompt_ids, req.params, lambda s, tok: events.put(tok))
            except RuntimeError as exc:
                raise APIError(503, str(exc), type_="server_error", code="shutting_down") from exc
            sent = ""
            hold = max((len(s) for s in req.stops), default=1) - 1
            try:
                while True:
                    tok = events.get()
                    if tok is None:
                        if seq.finish_reason == "error":
                            raise APIError(500, f"generation failed: {seq.error}", type_="server_error")
                        text = self.tokenizer.decode(seq.generated)
                        yield text[len(sent):], ("stop" if seq.finish_reason == "stop" else "length"), seq
                        return
                    text = self.tokenizer.decode(seq.generated)
                    cut = min((i for i in (text.find(s, max(0, len(sent) - hold)) for s in req.stops) if i >= 0), default=-1)
                    if cut >= 0:
                        self.engine.cancel(seq)
                        yield text[len(sent):cut], "stop", seq
                        return
                    ready = len(text) - hold
                    while ready > len(sent) and text[ready - 1] == "\ufffd":  # an unfinished multi-byte character
                        ready -= 1
                    if ready > len(sent):
                        yield text[len(sent):ready], None, seq
                        sent = text[:ready]
            finally:
                if not seq.done:  # the client went away (or an error): free the batch slot
                    self.engine.cancel(seq)
        finally:
            self._slots.release()
            self.requests_served += 1


# ----------------------------------------------------------------------------- HTTP handler
class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 60  # an idle keep-alive connection is closed after this many seconds
    server: _Server
    busy = False

    def setup(self) -> None:
        super().setup()
        with self.server.conns_lock:
            self.server.conns.add(self)

    def finish(self) -> None:
        with self.server.conns_lock:
            self.server.conns.discard(self)
        super().finish()

    def handle_one_request(self) -> None:
        # busy from a parsed request line to the end of its response
        super().handle_one_request()
        self.busy = False

    def parse_request(self) -> bool:
        self.busy = True
        return super().parse_request()

    def log_message(self, fmt: str, *args: Any) -> None:  # route the stdlib access log to logging
        logger.debug("%s " + fmt, self.address_string(), *args)

    @property
    def app(self) -> CompletionServer:
        return self.server.app

    def _json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.app._draining:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/health":
            app = self.app
            draining = app._draining or not app.engine.accepting
            self._json(503 if draining else 200, {"status": "draining" if draining else "ok",
                                                  "in_flight": app.engine.in_flight(), "model": app.model_name})
        elif path == "/v1/models":
            self._json(200, {"object": "list", "data": [self._model_card()]})
        elif path == f"/v1/models/{self.app.model_name}":
            self._json(200, self._model_card())
        else:
            self._json(404, APIError(404, f"no route GET {path}", code="not_found").body())

    def _model_card(self) -> dict:
        return {"id": self.app.model_name, "object": "model", "created": self.app.created, "owned_by": "paddle-semoe"}

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            if path not in ("/v1/completions", "/v1/chat/completions"):
                self._drain_body()
                raise APIError(404, f"no route POST {path}", code="not_found")
            body = self._read_json()
            req = self.app.parse(body, chat=path.endswith("chat/completions"))
            if req.stream:
                self._stream(req)
            else:
                self._complete(req)
        except APIError as err:
            self._json(err.status, err.body())
        except (BrokenPipeError, ConnectionResetError):
            logger.info("client %s disconnected", self.address_string())
            self.close_connection = True

    def _drain_body(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        if 0 < n <= self.app.limits.max_body_bytes:
            self.rfile.read(n)
        elif n:
            self.close_connection = True

    def _read_json(self) -> dict:
        try:
            n = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            raise APIError(400, "bad Content-Length header") from None
        if n > self.app.limits.max_body_bytes:
            self.close_connection = True
            raise APIError(413, f"request body of {n} bytes exceeds the limit of {self.app.limits.max_body_bytes}",
                           code="request_too_large")
        raw = self.rfile.read(n) if n else b""
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", code="invalid_json")
        return body

    def _ids(self, req: _Request) -> tuple[str, str]:
        return ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex[:24], "chat.completion" if req.chat else "text_completion"

    @staticmethod
    def _usage(req: _Request, seq: Sequence) -> dict:
        n = len(seq.generated)
        return {"prompt_tokens": len(req.prompt_ids), "completion_tokens": n, "total_tokens": len(req.prompt_ids) + n}

    def _complete(self, req: _Request) -> None:
        rid, obj = self._ids(req)
        events = list(self.app.generate(req))  # the last one carries the finish reason
        _, finish, seq = events[-1]
        text = "".join(delta for delta, _, _ in events)
        body = {"message": {"role": "assistant", "content": text}} if req.chat else {"text": text}
        choice = {"index": 0, "finish_reason": finish, "logprobs": None, **body}
        self._json(200, {"id": rid, "object": obj, "created": int(time.time()), "model": self.app.model_name,
                         "choices": [choice], "usage": self._usage(req, seq)})

    def _stream(self, req: _Request) -> None:
        rid, _ = self._ids(req)
        obj = "chat.completion.chunk" if req.chat else "text_completion"
        created = int(time.time())
        gen = self.app.generate(req)
        first = next(gen)  # errors (429, 503) surface here, before the 200 is sent
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

        def chunk(delta: str | None, finish: str | None, role: bool = False) -> dict:
            if req.chat:
                d: dict[str, Any] = {"role": "assistant", "content": ""} if role else ({} if delta is None else {"content": delta})
                c: dict[str, Any] = {"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}
            else:
                c = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            return {"id": rid, "object": obj, "created": created, "model": self.app.model_name, "choices": [c]}

        def send(obj_: dict | str) -> None:
            data = obj_ if isinstance(obj_, str) else json.dumps(obj_)
            self.wfile.write(f"data: {data}\n\n".encode())
            self.wfile.flush()

        try:
            if req.chat:
                send(chunk(None, None, role=True))
            seq = None
            for delta, finish, seq in itertools.chain((first,), gen):
                if delta:
                    send(chunk(delta, None))
                if finish is not None:
                    send(chunk(None if req.chat else "", finish))
            if req.include_usage and seq is not None:
                send({"id": rid, "object": obj, "created": created, "model": self.app.model_name, "choices": [],
                      "usage": self._usage(req, seq)})
            send("[DONE]")
        except APIError as err:  # headers are out: report in-band, as OpenAI does
            send({"error": err.body()["error"]})
        finally:
            gen.close()  # a disconnect (BrokenPipe) cancels the sequence in generate()'s finally

