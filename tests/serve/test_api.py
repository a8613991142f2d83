"""The API against a real server on the reference models (CPU, a few denoising steps)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

VIDEO_PROMPT = "a small red square moves left over a blue gradient"
IMAGE_PROMPT = "a large yellow triangle over an orange gradient"
COMPOSED = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "composed"


def test_video_job_completes_with_its_content_baseline_and_fidelity(serve, tiny, wait):
    with serve() as client:
        created = client.post("/v1/videos", json={"prompt": VIDEO_PROMPT, "recipe": "fixed-interval(interval=2)",
                                                  "compare_baseline": True, **tiny, "steps": 4})
        assert created.status_code == 200, created.text
        assert created.json()["status"] in ("queued", "in_progress")
        job = wait(client, created.json()["id"])
        assert job["status"] == "completed", job["error"]
        assert job["progress"] == 1.0 and job["step"] == job["total_steps"] == 8  # baseline + recipe
        assert job["stats"]["compute_fraction"] < 1  # some steps reused
        assert job["fidelity"]["psnr_db"] is not None and 0 < job["fidelity"]["psnr_db"] < 200
        assert 0 < job["fidelity"]["ssim"] <= 1
        assert job["timings"]["generation_s"] > 0 and job["timings"]["baseline_s"] > 0
        for url in (job["content_url"], job["baseline_url"]):
            content = client.get(url)
            assert content.status_code == 200 and content.headers["content-type"] == job["media_type"]
            data = content.content  # an animated WebP, or an MP4 where ffmpeg is installed
            assert (data[:4], data[8:12]) == (b"RIFF", b"WEBP") or data[4:8] == b"ftyp", data[:16]


def test_events_stream_progress_in_order_then_done(serve, tiny):
    with serve() as client:
        job = client.post("/v1/videos", json={"prompt": VIDEO_PROMPT, "recipe": "baseline", **tiny}).json()
        events = []
        with client.stream("GET", f"/v1/videos/{job['id']}/events") as stream:
            kind = None
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    events.append((kind, json.loads(line[6:])))
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) <= {"progress"}
    progress = [data["progress"] for _, data in events]
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert events[-1][1]["status"] == "completed"


BAD_REQUESTS = [
    ({"prompt": VIDEO_PROMPT, "model": "wan-14b"}, 422, ["'wan-14b'", "ref-video", "ref-image"]),
    ({"prompt": VIDEO_PROMPT, "recipe": "fastcache(x=1)"}, 422, ["'fastcache'", "fixed-interval", "magcache"]),
    ({"prompt": VIDEO_PROMPT, "recipe": "fixed-interval(interval=2"}, 422, ["never closed"]),
    ({"prompt": VIDEO_PROMPT, "recipe": "magcache(budget=3)"}, 422, ["budget=3", "(0, 1]"]),
    ({"prompt": VIDEO_PROMPT, "recipe": "/etc/recipe.toml"}, 422, ["not files"]),
    ({"prompt": VIDEO_PROMPT, "steps": 101}, 422, ["steps=101", "100"]),
    ({"prompt": VIDEO_PROMPT, "steps": 0}, 422, ["steps=0", "positive"]),
    ({"prompt": VIDEO_PROMPT, "height": 4096}, 422, ["height=4096", "1280"]),
    ({"prompt": VIDEO_PROMPT, "height": 30}, 422, ["height=30", "multiple of 4", "28, 32"]),
    ({"prompt": VIDEO_PROMPT, "size": "big"}, 422, ["size='big'", "WIDTHxHEIGHT"]),
    ({"prompt": VIDEO_PROMPT, "frames": 1000}, 422, ["frames=1000", "129"]),
    ({"prompt": VIDEO_PROMPT, "stepz": 3}, 422, ["'stepz'", "steps"]),
    ({"prompt": VIDEO_PROMPT, "model": "ref-image"}, 422, ["/v1/images/generations", "ref-video"]),
    ({"prompt": "a purple blob"}, 422, ["'blob'", "shapes"]),
    ({}, 422, ["'prompt' is required"]),
    ([1, 2], 422, ["JSON object"]),
]


def test_bad_requests_are_refused_naming_the_value_and_never_queued(serve):
    with serve() as client:
        for body, status, named in BAD_REQUESTS:
            answer = client.post("/v1/videos", json=body)
            assert answer.status_code == status, (body, answer.text)
            message = answer.json()["error"]["message"]
            for word in named:
                assert word in message, (body, message)
        assert client.get("/v1/videos").json()["data"] == []  # nothing was queued


def test_body_that_is_not_json_or_too_large_and_unknown_job(serve):
    with serve(max_body_bytes=2048) as client:
        not_json = client.post("/v1/videos", content=b"prompt=a small red square")
        assert not_json.status_code == 400 and "not JSON" in not_json.json()["error"]["message"]
        large = client.post("/v1/videos", json={"prompt": "x" * 4096})
        assert large.status_code == 413 and "2048" in large.json()["error"]["message"]
        for method, path in (("GET", "/v1/videos/video_nope"), ("DELETE", "/v1/videos/video_nope"),
                             ("GET", "/v1/videos/video_nope/content"), ("GET", "/v1/videos/video_nope/events")):
            missing = client.request(method, path)
            assert missing.status_code == 404 and "'video_nope'" in missing.json()["error"]["message"]


def test_api_key_is_required_on_v1_but_not_on_health(serve):
    with serve(api_key="s3cret") as client:
        assert client.get("/health").status_code == 200
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/v1/models?api_key=s3cret").status_code == 200
        refused = client.post("/v1/videos", json={"prompt": VIDEO_PROMPT})
        assert refused.status_code == 401 and "Bearer" in refused.json()["error"]["message"]


def test_cancel_drops_a_queued_job_and_stops_a_running_one_at_a_step(serve, wait):
    long = {"prompt": VIDEO_PROMPT, "recipe": "baseline", "steps": 100}
    with serve() as client:
        running = client.post("/v1/videos", json=long).json()
        queued = client.post("/v1/videos", json=long).json()
        dropped = client.delete(f"/v1/videos/{queued['id']}").json()
        assert dropped["status"] == "cancelled" and dropped["step"] == 0
        with client.stream("GET", f"/v1/videos/{running['id']}/events") as stream:
            for line in stream.iter_lines():
                if line.startswith("data: ") and json.loads(line[6:])["step"] >= 1:
                    break
        client.delete(f"/v1/videos/{running['id']}")
        stopped = wait(client, running["id"])
        assert stopped["status"] == "cancelled" and 1 <= stopped["step"] < 100
        assert client.delete(f"/v1/videos/{running['id']}").status_code == 409


def test_a_job_over_the_time_limit_fails_naming_the_limit(serve, wait):
    with serve(time_limit_s=0.5) as client:
        job = client.post("/v1/videos", json={"prompt": VIDEO_PROMPT, "recipe": "baseline", "steps": 100}).json()
        failed = wait(client, job["id"])
    assert failed["status"] == "failed" and "time limit of 0.5 s" in failed["error"]
    assert failed["step"] < 100


def test_a_recipe_that_fails_at_run_time_fails_the_job_not_the_server(serve, tiny, wait):
    with serve() as client:  # budget 0.3 of 2 steps allows no computed forward: known only with the steps
        job = client.post("/v1/videos", json={"prompt": VIDEO_PROMPT, "recipe": "magcache(budget=0.3)", **tiny}).json()
        failed = wait(client, job["id"])
        assert failed["status"] == "failed" and "budget=0.3" in failed["error"]
        after = client.post("/v1/videos", json={"prompt": VIDEO_PROMPT, "recipe": "baseline", **tiny}).json()
        assert wait(client, after["id"])["status"] == "completed"


def test_models_and_recipes_carry_what_the_tree_measured(serve):
    with serve() as client:
        models = {model["id"]: model for model in client.get("/v1/models").json()["data"]}
        assert models["ref-video"]["task"] == "video" and models["ref-image"]["task"] == "image"
        assert models["ref-video"]["default_size"] == {"height": 32, "width": 32, "frames": 16}
        recipes = client.get("/v1/recipes?model=ref-video").json()["data"]
        assert client.get("/v1/recipes?model=nope").status_code == 404
    default = next(entry for entry in recipes if entry["default"])
    assert default["recipe"] == models["ref-video"]["default_recipe"]
    assert default["summary"]  # the family's sentence (models/wan.py)
    if not COMPOSED.is_dir():
        pytest.skip("no benchmarks/results in this checkout: only the family sentences are served")
    recorded = {}
    for path in COMPOSED.glob("wan_composed*_h100_*.json"):
        data = json.loads(path.read_text())
        recorded.update((row["recipe"], row["speedup"]) for row in (data if isinstance(data, list) else data["results"]))
    assert default["real_size"]["speedup"] == pytest.approx(recorded[default["recipe"]], abs=0.01)
    assert default["fidelity"]["psnr_db"] > 0 and "ref-video" in default["fidelity"]["where"]


def test_image_generation_answers_with_the_png(serve):
    with serve() as client:
        answer = client.post("/v1/images/generations", json={"model": "ref-image", "prompt": IMAGE_PROMPT,
                                                             "steps": 2, "guidance_scale": 1.0})
        assert answer.status_code == 200, answer.text
        assert base64.b64decode(answer.json()["data"][0]["b64_json"])[:8] == b"\x89PNG\r\n\x1a\n"
        assert client.post("/v1/images/generations", json={"model": "ref-image", "prompt": IMAGE_PROMPT,
                                                           "n": 2}).status_code == 422


def test_metrics_are_prometheus_text(serve, tiny, wait):
    with serve() as client:
        job = client.post("/v1/videos", json={"prompt": VIDEO_PROMPT, "recipe": "baseline", **tiny}).json()
        wait(client, job["id"])
        text = client.get("/metrics").text
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert samples['cadence_jobs_finished_total{status="completed"}'] == "1"
    assert samples["cadence_queue_length"] == "0" and samples["cadence_queue_capacity"] == "16"
    assert float(samples["cadence_job_seconds_sum"]) > 0 and samples["cadence_job_seconds_count"] == "1"
