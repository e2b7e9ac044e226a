"""The HTTP API (FastAPI): ``/v1/predict``, ``/v1/model``, ``/healthz``, ``/readyz``,
``/metrics``, ``/openapi.json``.

Handlers never block the event loop: ``/v1/predict`` validates the body (pydantic), converts
it (:meth:`~serving.store.ServingStore.prepare`) and awaits the
:class:`~serving.batcher.MicroBatcher`, which runs one model call for all requests waiting.
Bodies larger than ``max_body_bytes`` are refused before they are read
(:class:`BodyLimit`).

Example::

    >>> from serving.store import ServingStore
    >>> from serving.batcher import MicroBatcher
    >>> store = ServingStore(shards=1)
    >>> app = create_app(store, MicroBatcher(store.predict, size=lambda p: p.n))
    >>> sorted(r.path for r in app.fastapi.routes if r.path.startswith("/v1"))
    ['/v1/model', '/v1/predict']
"""


import asyncio
import json
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from pydantic import ValidationError
from fastapi.responses import JSONResponse, Response

from monolith_py.errors import InvalidInputError, UnavailableError
from monolith_py.observe.metrics import CONTENT_TYPE_LATEST, counter, histogram, render
from serving.batcher import MicroBatcher, OverloadedError
from serving.schema import (
    ERROR_RESPONSES,
    ApiLimits,
    Health,
    ModelInfo,
    PredictResponse,
    make_schemas,
)
from serving.store import ServingStore

__all__ = ["create_app", "BodyLimit", "API_VERSION"]

API_VERSION = "1.0.0"


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes with 413.

    A ``Content-Length`` over the limit is refused before the app runs; the body is then
    read and dropped only while it stays under ``4 * limit`` (so ordinary clients that
    send their whole body before reading see the 413 instead of a reset connection),
    larger ones are answered at once and the connection closed. A chunked body is buffered
    up to the limit, then replayed to the app.
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = int(limit)
        self._m = counter("monolith_serving_body_too_large_total", "Bodies refused (413).")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.limit:
                    if declared <= 4 * self.limit:
                        await self._drain(receive, 0)
                    await self._refuse(send)
                    return
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body = msg.get("body", b"")
            size += len(body)
            more = msg.get("more_body", False)
            if size > self.limit:
                if more:
                    await self._drain(receive, size)
                await self._refuse(send)
                return
            chunks.append(body)
            if not more:
                break
        payload = b"".join(chunks)
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": payload, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _drain(self, receive: Any, size: int) -> None:
        while size <= 4 * self.limit:
            msg = await receive()
            size += len(msg.get("body", b""))
            if msg["type"] != "http.request" or not msg.get("more_body", False):
                return

    async def _refuse(self, send: Any) -> None:
        self._m.inc()
        body = json.dumps({"detail": f"request body larger than {self.limit} bytes; send "
                                     "fewer examples per request"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def create_app(store: ServingStore, batcher: MicroBatcher[Any, Any],
               limits: ApiLimits = ApiLimits(), *, request_timeout_s: float = 10.0) -> Any:
    """The ASGI app (FastAPI wrapped in :class:`BodyLimit`); ``app.fastapi`` is the inner
    FastAPI object (for ``openapi()``)."""
    _, PredictRequest = make_schemas(limits)
    api = FastAPI(
        title="monolith-py serving",
        version=API_VERSION,
        description="Online inference over embeddings synced from training within seconds.",
        docs_url=None, redoc_url=None,
    )
    m_req = counter("monolith_serving_requests_total", "HTTP predict requests by status.",
                    ["status"])
    m_lat = histogram("monolith_serving_predict_seconds", "Predict latency (handler).")
    m_ex = counter("monolith_serving_examples_total", "Examples scored.")

    def fail(status: int, msg: str) -> HTTPException:
        m_req.labels(status=str(status)).inc()
        return HTTPException(status_code=status, detail=msg)

    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # the echoed input is left out: it may hold NaN (not JSON) or be huge
        errors = [{"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", "")),
                   "type": str(e.get("type", ""))} for e in exc.errors()[:20]]
        m_req.labels(status="422").inc()
        return JSONResponse({"detail": errors}, status_code=422)

    def invalid_body(exc: ValidationError) -> JSONResponse:
        errors = [{"loc": ["body", *(str(x) for x in e.get("loc", ()))],
                   "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
                  for e in exc.errors()[:20]]
        m_req.labels(status="422").inc()
        return JSONResponse({"detail": errors}, status_code=422)

    # The body is parsed and validated in one pass by pydantic-core's JSON parser
    # (``model_validate_json``: ~5x faster than json.loads + model validation for a
    # 256-example batch); the OpenAPI document still describes it (see below).
    @api.post("/v1/predict", response_model=PredictResponse, responses=ERROR_RESPONSES,
              summary="Score a batch of examples", openapi_extra={"requestBody": {
                  "required": True, "content": {"application/json": {
                      "schema": {"$ref": "#/components/schemas/PredictRequest"}}}}})
    async def predict(request: Request) -> Response:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            body = PredictRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            return invalid_body(exc)
        examples = body.examples  # type: ignore[attr-defined]
        try:
            prepared = store.prepare([e.features for e in examples], [e.dense for e in examples])
            fut = batcher.submit(prepared)
        except InvalidInputError as exc:
            raise fail(422, str(exc)) from None
        except (OverloadedError, UnavailableError) as exc:
            raise fail(503, str(exc)) from None
        try:
            scores, version = await asyncio.wait_for(fut, request_timeout_s)
        except asyncio.TimeoutError:
            raise fail(504, f"no answer within {request_timeout_s} s") from None
        except UnavailableError as exc:
            raise fail(503, str(exc)) from None
        except InvalidInputError as exc:
            raise fail(422, str(exc)) from None
        m_req.labels(status="200").inc()
        m_ex.inc(len(examples))
        m_lat.observe(loop.time() - t0)
        content = ('{"scores":' + json.dumps(scores.tolist()) + ',"model_version":'
                   + json.dumps(version) + "}")
        return Response(content=content, media_type="application/json")

    @api.get("/v1/model", response_model=ModelInfo, summary="What is served")
    async def model() -> dict[str, Any]:
        return store.info()

    @api.get("/healthz", response_model=Health, summary="The process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "detail": ""}

    @api.get("/readyz", response_model=Health, summary="A model is loaded and synced",
             responses={503: {"model": Health, "description": "Not ready yet."}})
    async def readyz() -> Any:
        if store.ready:
            return {"status": "ready", "detail": ""}
        info = store.info()
        missing = [s["shard"] for s in info["shards"] if s["epoch"] is None]
        detail = ("no dense model yet" if info["model"] is None else
                  f"waiting for the first sync of shard(s) {missing}")
        return JSONResponse({"status": "not ready", "detail": detail}, status_code=503)

    @api.get("/metrics", summary="Prometheus metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {}}}})
    async def metrics() -> Response:
        return Response(content=render(), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            doc = get_openapi(title=api.title, version=api.version,
                              description=api.description, routes=api.routes)
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            body = PredictRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(body.pop("$defs", {}))
            schemas["PredictRequest"] = body
            api.openapi_schema = doc
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]
    app = BodyLimit(api, limits.max_body_bytes)
    app.fastapi = api  # type: ignore[attr-defined]
    return app
