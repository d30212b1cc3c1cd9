"""The service's FastAPI app: typed routes over a `ScoreAPI`, the same app under uvicorn and as Ray Serve's ingress.

`build_app(api)` is the one definition: `LocalServer` runs it with uvicorn, and each Ray Serve replica
returns it from `__serve_build_asgi_app__` (`@serve.ingress()`), so both deployments answer alike.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from finger_reward.serve.api import IDEMPOTENCY_HEADER, RequestError, ScoreAPI, access_log, error_response, json_response
from finger_reward.serve.schema import ErrorResponse, HealthResponse, ScoreRequest, ScoreResponse

UNSCORED = ("/metrics", "/v1/health")  # probes would swamp the scoring figures
_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 409, 413, 422, 429, 500)}


def build_app(api: ScoreAPI) -> FastAPI:
    """The FastAPI app answering `POST /v1/score`, `GET /v1/health`, `GET /metrics`, `/docs` and `/openapi.json`."""
    app = FastAPI(title="FingER reward service", version="1", docs_url=None, openapi_url=None,
                  description="Fine-grained video rewards (FingER): per video, an overall score, five dimension "
                              "scores and every question's P(Yes)/P(No).")
    app.add_middleware(AccessLog, api=api)

    def authorized(authorization: Annotated[str | None, Header()] = None) -> None:
        api.check_token(authorization)

    guarded = [Depends(authorized)]

    @app.exception_handler(RequestError)
    async def refused(request: Request, err: RequestError):
        return error_response(err.status, str(err), err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        hint = "; try POST /v1/score, GET /v1/health or GET /metrics" if err.status_code == 404 else ""
        return error_response(err.status_code, f"{err.detail}: {request.method} {request.url.path}{hint}",
                              getattr(err, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError):
        return error_response(400, str(err.errors()[0].get("msg")))

    @app.exception_handler(Exception)
    async def internal(request: Request, err: Exception):  # the service keeps serving whatever one request does
        return error_response(500, f"internal error: {type(err).__name__}: {err}")

    @app.post("/v1/score", response_model=ScoreResponse, responses=_ERRORS, dependencies=guarded,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": {"$ref": "#/components/schemas/ScoreRequest"}}}}})
    async def score(request: Request):
        """Score videos against their prompts; a bad video fails alone (its "error", status 400) while the rest
        are scored. Send an `Idempotency-Key` header to make retries safe: a repeat gets the first answer."""
        body = await api.read_body(request)  # read here, not by FastAPI: the size limit applies while reading
        status, payload, videos = await api.score(body, request.headers.get(IDEMPOTENCY_HEADER))
        request.scope["finger_videos"] = videos
        return json_response(status, payload)

    @app.get("/v1/health", response_model=HealthResponse)
    async def health():
        """Liveness, the sampling settings clients sample in-memory frames with, and the payload limit."""
        return json_response(200, api.health())

    @app.get("/metrics", response_class=PlainTextResponse, dependencies=guarded)
    async def metrics():
        """Prometheus metrics (`prometheus_client`)."""
        body, content_type = api.telemetry.render()
        return PlainTextResponse(body, media_type=content_type)

    @app.get("/openapi.json", include_in_schema=False, dependencies=guarded)
    async def openapi():
        schema = app.openapi()
        schema.setdefault("components", {}).setdefault("schemas", {}).update(_request_schemas())
        return schema

    @app.get("/docs", include_in_schema=False, dependencies=guarded)
    async def docs():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="FingER reward service")

    return app


def _request_schemas() -> dict:
    """ScoreRequest and the video forms it references, for the body FastAPI does not parse itself."""
    schema = ScoreRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    return {**schema.pop("$defs", {}), "ScoreRequest": schema}


class AccessLog:
    """One log line per request (method, path, status, videos, seconds, client), and the request metrics.

    Never logs a body: video bytes stay out of the logs."""

    def __init__(self, app, api: ScoreAPI):
        self.app, self.api = app, api

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - start
            path, videos = scope.get("path", ""), scope.get("finger_videos", 0)
            client = scope.get("client")
            address = f"{client[0]}:{client[1]}" if client else "-"
            if path not in UNSCORED:
                self.api.telemetry.request(status[0], seconds, videos)
            access_log.info("%s %s %d videos=%d %.3fs client=%s", scope.get("method"), path, status[0], videos,
                            seconds, address)
