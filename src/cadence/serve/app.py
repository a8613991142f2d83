"""The HTTP API (FastAPI): OpenAI-style routes over the worker and the job store.

Errors have OpenAI's shape, ``{"error": {"message", "type", "param"}}``, and their message
names the bad value and the valid ones: 400 a body that is not JSON, 401 a missing or wrong
API key, 404 an unknown job, 409 cancelling a finished job, 413 a body over the limit, 422 a
request cadence refuses (unknown model or recipe, steps or size beyond the limits), 429 a
full queue (with ``Retry-After``).
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles

from cadence.serve import requests
from cadence.serve.jobs import COMPLETED, FINISHED, MEDIA_TYPES, Job, JobStore
from cadence.serve.metrics import render
from cadence.serve.pipelines import ServedModel, load_models
from cadence.serve.settings import ServeSettings
from cadence.serve.worker import QueueFull, Worker

STATIC = Path(__file__).parent / "static"
HEARTBEAT_S = 15.0  # a comment line keeps proxies from closing an idle stream


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.param, self.headers = status, param, headers or {}


def _error(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param}}, status, headers=headers)


def create_app(settings: ServeSettings, models: dict[str, ServedModel] | None = None) -> FastAPI:
    """The app; ``models`` already loaded (tests share them), or loaded when it starts."""
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        store = JobStore(settings.data_dir)
        recovered = store.recover()
        served = models if models is not None else await asyncio.to_thread(load_models, settings)
        worker = Worker(settings, served, store)
        loop = asyncio.get_running_loop()
        state.update(store=store, models=served, worker=worker, started=time.time(), changed=asyncio.Event())

        def pulse():  # wake every event stream; each then looks at its own job
            state["changed"].set()
            state["changed"] = asyncio.Event()

        store.listeners.append(lambda: loop.call_soon_threadsafe(pulse))
        worker.start(recovered)
        yield
        await asyncio.to_thread(worker.stop)

    app = FastAPI(title="cadence", lifespan=lifespan, docs_url="/docs")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError):
        return _error(error.status, str(error), error.param, error.headers)

    @app.exception_handler(requests.RequestError)
    async def request_error(request: Request, error: requests.RequestError):
        return _error(error.status, str(error), error.param)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"][1:])
        return _error(422, f"{where}={first.get('input')!r}: {first['msg'].lower()}", where)

    def authorize(request: Request) -> None:
        """``Authorization: Bearer KEY`` (or ``?api_key=KEY``: a <video> or EventSource cannot
        send a header)."""
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else request.query_params.get("api_key")
        if not given:
            raise ApiError(401, "this server needs an API key: send 'Authorization: Bearer KEY'")
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise ApiError(401, "the API key is wrong")

    async def body(request: Request):
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > settings.max_body_bytes:
            raise ApiError(413, f"the body has {declared} bytes, over this server's limit of {settings.max_body_bytes}")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > settings.max_body_bytes:
                raise ApiError(413, f"the body is over this server's limit of {settings.max_body_bytes} bytes")
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ApiError(400, f"the body is not JSON ({error}); send a JSON object such as "
                                '{"prompt": "a small red square moves left over a blue gradient"}') from None

    def job_or_404(job_id: str) -> Job:
        job = state["store"].get(job_id)
        if job is None:
            raise ApiError(404, f"no job {job_id!r}; GET /v1/videos lists the jobs", "id")
        return job

    def submit(job: Job) -> Job:
        try:
            state["worker"].submit(job)
        except QueueFull as full:
            raise ApiError(429, str(full), headers={"Retry-After": str(full.retry_after)}) from None
        return job

    guarded = [Depends(authorize)]

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health():
        worker = state["worker"]
        return {"status": "ok", "models": list(state["models"]), "queued": len(worker.queue),
                "running": len(worker.running), "uptime_s": time.time() - state["started"]}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return PlainTextResponse(render(state["worker"], settings), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=guarded)
    async def list_models():
        return {"object": "list", "data": [model.describe() for model in state["models"].values()]}

    @app.get("/v1/recipes", dependencies=guarded)
    async def list_recipes(model: str | None = None):
        served = state["models"]
        if model is not None and model not in served:
            raise ApiError(404, f"unknown model {model!r}; valid: {', '.join(served)}", "model")
        chosen = [served[model]] if model else list(served.values())
        return {"object": "list", "data": [{"model": entry.name, **recipe} for entry in chosen for recipe in entry.recipes]}

    @app.post("/v1/videos", dependencies=guarded)
    async def create_video(request: Request):
        parsed = requests.parse(requests.VideoRequest, await body(request))
        return submit(requests.check(parsed, state["models"], settings, "video")).public()

    @app.get("/v1/videos", dependencies=guarded)
    async def list_videos(limit: int = 100):
        jobs = state["store"].all()[::-1][: max(0, limit)]
        return {"object": "list", "data": [job.public() for job in jobs]}

    @app.get("/v1/videos/{job_id}", dependencies=guarded)
    async def get_video(job_id: str):
        return job_or_404(job_id).public()

    @app.delete("/v1/videos/{job_id}", dependencies=guarded)
    async def cancel_video(job_id: str):
        job = job_or_404(job_id)
        if job.finished:
            raise ApiError(409, f"job {job_id!r} is {job.status} already; only queued or running jobs can be cancelled")
        return state["worker"].cancel(job).public()

    @app.get("/v1/videos/{job_id}/content", dependencies=guarded)
    async def video_content(job_id: str, variant: str = "video"):
        job = job_or_404(job_id)
        if variant not in ("video", "baseline"):
            raise ApiError(422, f"variant={variant!r}; valid: video, baseline", "variant")
        name = job.content if variant == "video" else job.baseline_content
        if name is None:
            why = f"it is {job.status}" if job.status != COMPLETED else "it was not asked to compare with the baseline"
            raise ApiError(404, f"job {job_id!r} has no {variant} content: {why}", "variant")
        path = state["store"].path(job.id, name)
        return FileResponse(path, media_type=MEDIA_TYPES.get(path.suffix, "application/octet-stream"))

    @app.get("/v1/videos/{job_id}/events", dependencies=guarded)
    async def video_events(job_id: str, request: Request):
        job = job_or_404(job_id)

        async def stream():
            seen = -1
            while not await request.is_disconnected():
                changed = state["changed"]  # taken before looking: a change after the look still wakes us
                if job.version != seen:
                    seen = job.version
                    kind = "done" if job.status in FINISHED else "progress"
                    yield f"event: {kind}\ndata: {json.dumps(job.public())}\n\n"
                    if kind == "done":
                        return
                    continue
                try:
                    await asyncio.wait_for(changed.wait(), HEARTBEAT_S)
                except asyncio.TimeoutError:
                    yield ": waiting\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/images/generations", dependencies=guarded)
    async def create_image(request: Request):
        parsed = requests.parse(requests.ImageRequest, await body(request))
        job = submit(requests.check(parsed, state["models"], settings, "image"))
        while True:  # the OpenAI images API answers with the image itself
            changed = state["changed"]  # taken before looking, as the event stream does
            if job.finished:
                break
            await changed.wait()
        if job.status != COMPLETED:
            raise ApiError(500 if job.status == "failed" else 409, f"job {job.id} {job.status}: {job.error}")
        if parsed.response_format == "url":
            item = {"url": f"/v1/videos/{job.id}/content"}
        else:
            item = {"b64_json": base64.b64encode(state["store"].path(job.id, job.content).read_bytes()).decode()}
        return {"created": int(job.created_at), "data": [item], "cadence": job.public()}

    return app
