"""50 concurrent requests against one device slot and a queue of 16: each is answered once
(a job or a 429 with a retry hint), every accepted job finishes, none is lost or duplicated,
and the server's memory stays bounded."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import psutil

PROMPT = "a small red square moves left over a blue gradient"
REQUESTS = 50
QUEUE = 16


async def _burst(base_url: str, body: dict) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        return await asyncio.gather(*(client.post("/v1/videos", json={**body, "seed": seed})
                                      for seed in range(REQUESTS)))


def test_fifty_concurrent_requests_are_each_answered_and_none_lost(serve, tiny, wait, tmp_path):
    process = psutil.Process()
    with serve(concurrency=1, queue_size=QUEUE) as client:
        resident_before = process.memory_info().rss
        queued_seen, done = [], threading.Event()

        def watch():  # the queue never holds more than its capacity
            while not done.is_set():
                queued_seen.append(client.get("/health").json()["queued"])
                done.wait(0.05)

        watcher = threading.Thread(target=watch)
        watcher.start()
        answers = asyncio.run(_burst(str(client.base_url), {"prompt": PROMPT, "recipe": "baseline", **tiny}))
        accepted = [answer.json()["id"] for answer in answers if answer.status_code == 200]
        rejected = [answer for answer in answers if answer.status_code == 429]
        finished = [wait(client, job_id) for job_id in accepted]
        done.set()
        watcher.join()
        listed = [job["id"] for job in client.get("/v1/videos?limit=1000").json()["data"]]
        metrics = client.get("/metrics").text
        resident_after = process.memory_info().rss

    assert len(accepted) + len(rejected) == REQUESTS  # every request answered, with a job or a 429
    assert len(accepted) >= QUEUE and rejected  # the queue filled, and the rest were told to retry
    for answer in rejected:
        assert int(answer.headers["Retry-After"]) >= 1 and "queue is full" in answer.json()["error"]["message"]
    assert len(set(accepted)) == len(accepted)  # no job id twice
    assert all(job["status"] == "completed" for job in finished)
    assert sorted(listed) == sorted(accepted)  # the server knows exactly the accepted jobs
    records = sorted(path.stem for path in (tmp_path / "data" / "jobs").glob("*.json"))
    assert records == sorted(accepted)  # and so does the disk
    assert {json.loads((tmp_path / "data" / "jobs" / f"{job_id}.json").read_text())["status"]
            for job_id in accepted} == {"completed"}
    assert max(queued_seen) <= QUEUE
    assert f"cadence_jobs_rejected_total {len(rejected)}" in metrics
    print(f"resident memory: {resident_before / 2**20:.0f} MiB before the burst, {resident_after / 2**20:.0f} MiB after")
    # the jobs' outputs are on disk, not in memory: the process grows by far less than its models
    assert resident_after - resident_before < 300 * 2**20, (resident_before, resident_after)
