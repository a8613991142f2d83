"""A real server (uvicorn on a free local port, in a thread) around the reference models,
loaded once per session: each test starts its own server, with its own data directory and
limits, over the same pipelines."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import httpx
import pytest

# a generation of a few seconds or less on a busy 2-core CPU: 1 frame of 16 x 16, no CFG
TINY = {"steps": 2, "frames": 1, "height": 16, "width": 16, "guidance_scale": 1.0}


@pytest.fixture(scope="session")
def models():
    from cadence.serve.pipelines import load_models
    from cadence.serve.settings import ServeSettings

    return load_models(ServeSettings(models=("ref-video", "ref-image")))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running(settings, models):
    """-> an httpx client on a started server; the server stops (its worker too) on exit."""
    import uvicorn

    from cadence.serve.app import create_app

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings, models), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(60)


@pytest.fixture
def serve(tmp_path, models):
    """``with serve(queue_size=4) as client:`` a server with these settings over ``tmp_path``,
    serving the session's reference models (or ``served``, loaded by the test)."""
    from cadence.serve.settings import ServeSettings

    def start(served=None, **overrides):
        served = served or models
        overrides.setdefault("data_dir", tmp_path / "data")
        return running(ServeSettings(models=tuple(served), **overrides), served)

    return start


@pytest.fixture
def tiny() -> dict:
    return dict(TINY)


@pytest.fixture
def wait():
    """``wait(client, job_id)`` -> the job once finished."""
    return wait_finished


def wait_finished(client: httpx.Client, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/videos/{job_id}").json()
        if job["status"] in ("completed", "failed", "cancelled"):
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
        time.sleep(0.01)
