"""Jobs survive a restart: finished ones keep their record and content, the one that was
running when the process was killed is marked failed (never silently lost), and queued ones
run after the restart."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from cadence.serve.jobs import COMPLETED, FAILED, QUEUED, RUNNING, Job, JobStore, new_id

PROMPT = "a small red square moves left over a blue gradient"


def _job(status: str, created_at: float) -> Job:
    return Job(id=new_id(), kind="video", model="ref-video", prompt=PROMPT, recipe="baseline", steps=2, seed=0,
               guidance_scale=1.0, height=16, width=16, frames=1, status=status, created_at=created_at)


def test_recover_keeps_finished_fails_running_and_requeues_queued_in_order(tmp_path):
    store = JobStore(tmp_path)
    jobs = [_job(status, created) for created, status in enumerate((COMPLETED, RUNNING, QUEUED, FAILED, QUEUED))]
    for job in jobs:
        store.add(job)
    (store.directory / "damaged.json").write_text("{not json")
    reopened = JobStore(tmp_path)
    requeued = reopened.recover()
    assert [job.id for job in requeued] == [jobs[2].id, jobs[4].id]
    statuses = {job.id: job.status for job in reopened.all()}
    assert statuses == {jobs[0].id: COMPLETED, jobs[1].id: FAILED, jobs[2].id: QUEUED, jobs[3].id: FAILED,
                        jobs[4].id: QUEUED}
    assert "server stopped" in reopened.get(jobs[1].id).error
    assert json.loads(reopened.path(jobs[1].id).read_text())["status"] == FAILED  # written, not only in memory
    assert (store.directory / "damaged.unreadable").is_file()
    assert not list(store.directory.glob(".*partial"))  # atomic writes leave nothing behind


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start(data_dir: Path, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "cadence.cli", "serve", "--model", "ref-video", "--port", str(port),
               "--data-dir", str(data_dir), "--device", "cpu"]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ},
                            start_new_session=True)


def _wait_up(client: httpx.Client, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {process.stderr.read().decode()[-2000:]}")
        try:
            if client.get("/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError("the server did not come up")


def _until(client: httpx.Client, job_id: str, done, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/videos/{job_id}").json()
        if done(job):
            return job
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id}: {job}")


def test_a_killed_server_keeps_its_jobs_across_a_restart(tmp_path):
    port = _free_port()
    tiny = {"prompt": PROMPT, "recipe": "baseline", "steps": 2, "frames": 1, "height": 16, "width": 16,
            "guidance_scale": 1.0}
    process = _start(tmp_path, port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            _wait_up(client, process)
            finished = client.post("/v1/videos", json=tiny).json()["id"]
            _until(client, finished, lambda job: job["status"] == COMPLETED)
            running = client.post("/v1/videos", json={**tiny, "steps": 100, "frames": 16, "height": 32,
                                                      "width": 32, "guidance_scale": 4.0}).json()["id"]
            queued = client.post("/v1/videos", json=tiny).json()["id"]
            _until(client, running, lambda job: job["step"] >= 1)
            os.killpg(process.pid, signal.SIGKILL)  # no shutdown: what a crash or an OOM kill leaves
            process.wait(30)

        process = _start(tmp_path, port)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            _wait_up(client, process)
            assert client.get(f"/v1/videos/{finished}").json()["status"] == COMPLETED
            assert client.get(f"/v1/videos/{finished}/content").status_code == 200
            failed = client.get(f"/v1/videos/{running}").json()
            assert failed["status"] == FAILED and "server stopped" in failed["error"]
            assert _until(client, queued, lambda job: job["status"] == COMPLETED)["content_url"]
            listed = sorted(job["id"] for job in client.get("/v1/videos").json()["data"])
            assert listed == sorted([finished, running, queued])  # nothing lost, nothing twice
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(60)
