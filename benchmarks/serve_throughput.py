"""Throughput through `cadence serve`: videos per hour with a recipe against the unaccelerated
model, measured as a client sees it (HTTP in, content out), and the server's overhead per job
beyond generation.

A real server (uvicorn on a local port, in this process, the models loaded once) is driven
over HTTP by the standard library's client:

1. overhead: ``--overhead-jobs`` jobs one at a time (the queue empty); per job, the time from
   POST to the job's "done" event, minus its generation time (``timings.generation_s``, the
   pipeline call alone): queueing, the slot's wake-up, writing the file, the event stream.
2. throughput, per recipe: one untimed warm-up job (``--warmup-steps``: compile traces there),
   then ``--jobs`` jobs submitted at once; videos/hour = jobs x 3600 / (last done - first POST).

    python benchmarks/serve_throughput.py --model ref-video --jobs 3 --steps 4 --device cpu

At the Wan2.1-1.3B size with random weights (``--build-wan DIR`` writes that pipeline: a
random WanTransformer3DModel at the 1.3B config, the real-config AutoencoderKLWan, and a
small random UMT5 encoder with a word-level tokenizer, so nothing is downloaded):

    python benchmarks/serve_throughput.py --build-wan /tmp/wan13b --calibrate \\
        --model /tmp/wan13b --dtype bfloat16 --jobs 2 --steps 50 --out $OUT/serve_throughput.json

Random weights cost the same time as trained ones; the small text encoder does not (the real
umT5-XXL runs once per prompt, a small share of a 50-step generation).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from datetime import date
from pathlib import Path

import torch

WAN_1_3B = {  # Wan2.1-T2V-1.3B's transformer config (as benchmarks/wan_realsize.py)
    "patch_size": (1, 2, 2), "num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16, "out_channels": 16,
    "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30, "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024,
}
TEXT_TOKENS = 512  # the Wan pipeline pads prompts to umT5's 512 tokens
PROMPT = "a small red square moves left over a blue gradient"


# -- the random-weight Wan pipeline ------------------------------------------------------------

def build_wan(directory: Path, transformer_config: dict = WAN_1_3B, vae_config: dict | None = None,
              dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """Write a WanPipeline directory with random weights that ``cadence.load`` reads."""
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    words = sorted({word for caption in (PROMPT, "a large yellow circle moves right over a plain white background")
                    for word in caption.split()})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{word: index + 3 for index, word in enumerate(words)}}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>", model_max_length=TEXT_TOKENS)
    # d_model must be the transformer's text_dim; one layer keeps it small (about 20 M parameters)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(vocab), d_model=transformer_config["text_dim"], d_kv=64,
                                               d_ff=512, num_layers=1, num_heads=4, relative_attention_num_buckets=32))
    vae = AutoencoderKLWan(**(vae_config or {}))  # the defaults are Wan2.1's VAE config
    transformer = WanTransformer3DModel(**transformer_config)
    # Wan2.1's scheduler config: UniPC on flow-matching sigmas with shift 3 (480p)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        num_train_timesteps=1000)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder.to(dtype), vae=vae,
                       transformer=transformer.to(dtype), scheduler=scheduler)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


# -- a client in the standard library ----------------------------------------------------------

class Client:
    def __init__(self, base_url: str):
        self.base_url = base_url

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base_url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=3600) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"{}")

    def until_done(self, job_id: str) -> dict:
        """Follow the job's event stream to its "done" event."""
        with urllib.request.urlopen(f"{self.base_url}/v1/videos/{job_id}/events", timeout=3600) as stream:
            kind = None
            for raw in stream:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: ") and kind == "done":
                    return json.loads(line[6:])
        raise RuntimeError(f"the event stream of {job_id} ended before its done event")


def _submit(client: Client, body: dict) -> dict:
    status, job = client.request("POST", "/v1/videos", body)
    if status != 200:
        raise RuntimeError(f"POST /v1/videos answered {status}: {job}")
    return job


def measure_overhead(client: Client, body: dict, jobs: int) -> dict:
    rows = []
    for seed in range(jobs):
        begin = time.perf_counter()
        job = client.until_done(_submit(client, {**body, "seed": seed})["id"])
        seen = time.perf_counter() - begin
        if job["status"] != "completed":
            raise RuntimeError(f"job failed: {job['error']}")
        timings = job["timings"]
        overhead = seen - timings["generation_s"]
        rows.append({"client_s": seen, "generation_s": timings["generation_s"], "overhead_s": overhead,
                     "queued_s": timings["queued_s"], "write_s": timings["write_s"],
                     # what the server adds beside encoding the output: queue, slot wake-up, records, HTTP, events
                     "serving_s": overhead - timings["write_s"]})
    pick = lambda key: 1000 * statistics.median(row[key] for row in rows)
    return {"jobs": jobs, "p50_overhead_ms": pick("overhead_s"), "p50_serving_ms": pick("serving_s"),
            "p50_queued_ms": pick("queued_s"), "p50_write_ms": pick("write_s"),
            "p50_generation_s": pick("generation_s") / 1000,
            "max_serving_ms": 1000 * max(row["serving_s"] for row in rows), "rows": rows}


def measure_throughput(client: Client, body: dict, recipe: str, jobs: int, warmup_steps: int) -> dict:
    warm = client.until_done(_submit(client, {**body, "recipe": recipe, "steps": warmup_steps, "seed": 999})["id"])
    begin = time.perf_counter()
    submitted = [_submit(client, {**body, "recipe": recipe, "seed": seed}) for seed in range(jobs)]
    done: list[dict] = [None] * jobs

    def follow(index: int):
        done[index] = client.until_done(submitted[index]["id"])

    followers = [threading.Thread(target=follow, args=(index,)) for index in range(jobs)]
    for thread in followers:
        thread.start()
    for thread in followers:
        thread.join()
    wall = time.perf_counter() - begin
    failed = [job["error"] for job in done if job["status"] != "completed"]
    if failed:
        raise RuntimeError(f"{recipe}: {len(failed)} job(s) failed: {failed[0]}")
    generation = [job["timings"]["generation_s"] for job in done]
    return {"recipe": recipe, "applied": done[0]["recipe"], "jobs": jobs, "wall_s": wall,
            "videos_per_hour": jobs * 3600 / wall, "mean_generation_s": statistics.mean(generation),
            "warmup": {"steps": warmup_steps, "status": warm["status"], "error": warm["error"]},
            "compute_fraction": done[0]["stats"].get("compute_fraction")}


# -- the run --------------------------------------------------------------------------------------

def _serve(settings, models):
    import socket

    import uvicorn

    from cadence.serve.app import create_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings, models), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    return server, thread, Client(f"http://127.0.0.1:{port}")


def calibrate(model: str, steps: int, size: dict, device: str) -> None:
    """MagCache's calibration for a checkpoint (the family default needs one), as `cadence calibrate`;
    kept where it is already (a rerun after a cut-off call starts where that one stopped)."""
    if (Path(model) / "transformer" / "calibration" / "magcache.json").is_file():
        print(f"{model}: MagCache calibration found, kept", flush=True)
        return
    # one prompt: `cadence calibrate` loads the transformer in float32, about 3x a bf16 forward
    command = [sys.executable, "-m", "cadence.cli", "calibrate", "--model", model, "--technique", "magcache",
               "--prompts", "1", "--steps", str(steps), "--device", device]
    command += [f"--{name}={value}" for name, value in size.items() if value is not None]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ref-video", help="ref-video, or a checkpoint directory")
    parser.add_argument("--build-wan", type=Path, default=None, help="first write the random Wan2.1-1.3B pipeline here")
    parser.add_argument("--calibrate", action="store_true", help="first calibrate MagCache on --model (--calibration-steps)")
    parser.add_argument("--calibration-steps", type=int, default=10)
    parser.add_argument("--recipes", nargs="+", default=["default", "baseline"])
    parser.add_argument("--jobs", type=int, default=3, help="jobs per recipe, submitted at once (0: overhead only)")
    parser.add_argument("--overhead-jobs", type=int, default=10, help="jobs one at a time for the overhead")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, default=5, help="a MagCache budget needs a few steps to compute one")
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/cadence-serve-throughput"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.build_wan is not None and not (args.build_wan / "model_index.json").is_file():
        begin = time.perf_counter()
        build_wan(args.build_wan)
        print(f"built {args.build_wan} in {time.perf_counter() - begin:.0f} s", flush=True)
    size = {"height": args.height, "width": args.width, "frames": args.frames}
    if args.calibrate:
        calibrate(args.model, args.calibration_steps, size, args.device)

    from cadence.serve.pipelines import load_models
    from cadence.serve.settings import ServeSettings

    settings = ServeSettings(models=(args.model,), device=args.device, dtype=args.dtype, data_dir=args.data_dir,
                             queue_size=max(16, args.jobs), steps=args.steps, max_steps=max(100, args.steps),
                             time_limit_s=3600)
    begin = time.perf_counter()
    models = load_models(settings)
    loaded_s = time.perf_counter() - begin
    name = next(iter(models))
    body = {"model": name, "prompt": PROMPT, "steps": args.steps, "guidance_scale": args.guidance_scale,
            **{key: value for key, value in size.items() if value is not None}}
    server, thread, client = _serve(settings, models)
    try:
        overhead = measure_overhead(client, {**body, "recipe": "baseline"}, args.overhead_jobs) \
            if args.overhead_jobs else None
        if overhead:
            print(f"overhead per job beyond generation, p50: {overhead['p50_overhead_ms']:.1f} ms = serving "
                  f"{overhead['p50_serving_ms']:.1f} ms (of which queued {overhead['p50_queued_ms']:.1f} ms) + writing "
                  f"the video {overhead['p50_write_ms']:.1f} ms; generation p50 {overhead['p50_generation_s']:.2f} s",
                  flush=True)
        runs = []
        for recipe in args.recipes if args.jobs else ():  # --jobs 0: the overhead alone
            runs.append(measure_throughput(client, body, recipe, args.jobs, args.warmup_steps))
            run = runs[-1]
            print(f"{recipe} ({run['applied']}): {run['videos_per_hour']:.1f} videos/hour ({args.jobs} jobs in "
                  f"{run['wall_s']:.1f} s; generation {run['mean_generation_s']:.2f} s each)", flush=True)
    finally:
        server.should_exit = True
        thread.join(120)
    model = models[name]
    from cadence import generation

    resolved = generation.resolve_size(model.pipe, args.height, args.width, args.frames)
    result = {"meta": {"model": args.model, "size": str(resolved), "steps": args.steps,
                       "guidance_scale": args.guidance_scale, "device": torch.cuda.get_device_name()
                       if args.device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)",
                       "dtype": args.dtype, "torch": torch.__version__, "date": str(date.today()),
                       "load_s": loaded_s, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])},
              "overhead": overhead, "throughput": runs}
    by_recipe = {run["recipe"]: run["videos_per_hour"] for run in runs}
    if "baseline" in by_recipe and len(by_recipe) > 1:
        result["speedup"] = {recipe: rate / by_recipe["baseline"] for recipe, rate in by_recipe.items()}
        print("throughput over baseline: " + ", ".join(f"{r} {s:.2f}x" for r, s in result["speedup"].items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
