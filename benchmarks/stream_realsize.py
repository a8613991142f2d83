"""Streaming at the real size: a Wan2.1-1.3B-size WanTransformer3DModel (random weights, bf16)
generating 480 x 832 video chunk by chunk through ``cadence.stream`` (latents 16 x 60 x 104,
chunks of 3 latent frames, 4 steps per chunk, plus the timestep-0 pass that writes each chunk's
KV), with a sink of 3 + a window of 12 latent frames by default (LongLive's).

    python benchmarks/stream_realsize.py --seconds 120 --out $OUT/stream_realsize.json
    python benchmarks/stream_realsize.py --kv-format fp8 --compile --out $OUT/stream_fp8_compiled.json
    python benchmarks/stream_realsize.py --recipe "attention-backend(backend='sage') + fp8" --compile --out $OUT/stream_composed.json
    python benchmarks/stream_realsize.py --size tiny --device cpu      # the CPU check, seconds

Reports, after a warm-up stream of two chunks (which also compiles, with ``--compile``):

- ``first_chunk_s``: time from the call to the first finished chunk (CUDA events on a GPU): the
  transformer alone, or with ``--vae`` the transformer and Wan2.1's VAE decoding each chunk as it
  comes (``cadence.stream.decode``, random weights, bf16); the text encoder is left out.
- ``video_fps``: video frames per second of the whole stream, counting each latent frame as 4
  video frames (Wan's VAE is 4x in time; its first latent frame decodes to 1 frame, which this
  ignores) at 16 video frames per second of video (Wan2.1's rate). ``latent_fps`` is the raw rate.
- ``steady_video_fps``: the same from the second chunk on.
- ``peak_memory_gib_by_minute``: the peak allocated memory within each minute of generated video
  (the statistic is reset at each minute's first chunk), so flat memory reads as equal entries;
  ``kv_bytes_by_minute``: the KV cache's own bytes at the end of each minute.

Random weights cost the same time as trained ones for a fixed amount of compute; no quality is
measured here (no trained stream model yet).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

from cadence import accelerate
from cadence.accel.registry import get_technique
from cadence.accel.sequence import FullConfig, KVFormatConfig, SinkWindowConfig, WindowConfig
from cadence.accel.sequence.formats import FORMATS
from cadence.models.real_configs import WAN_1_3B, WAN_TEXT_TOKENS, cast_like_from_pretrained
from cadence.stream import stream

VIDEO_FPS = 16  # Wan2.1 generates 16 frames a second
VIDEO_PER_LATENT = 4  # Wan's VAE: 4 video frames per latent frame
TINY = {"patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 16,
        "out_channels": 16, "text_dim": 32, "freq_dim": 16, "ffn_dim": 32, "num_layers": 2, "rope_max_seq_len": 64}
TINY_VAE = {"base_dim": 3, "z_dim": 16, "dim_mult": [1, 1, 1, 1], "num_res_blocks": 1,
            "temperal_downsample": [False, True, True]}
VAES = {"real": {}, "tiny": TINY_VAE}  # diffusers' defaults are Wan2.1's VAE
SIZES = {  # config, latent height x width, text tokens, dtype
    "real": (WAN_1_3B, (60, 104), WAN_TEXT_TOKENS, torch.bfloat16),  # 480 x 832 through the 8x VAE
    "tiny": (TINY, (8, 8), 8, torch.float32),
}


def make_policy(args):
    if args.policy == "full":
        return FullConfig(cap_frames=args.cap_frames)
    if args.policy == "window":
        return WindowConfig(frames=args.window)
    return SinkWindowConfig(sink=args.sink, frames=args.window)


class Clock:
    """Elapsed seconds since ``start()``: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def start(self) -> None:
        if self.cuda:
            self.begin = torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.begin = time.perf_counter()

    def elapsed(self) -> float:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return self.begin.elapsed_time(end) / 1000
        return time.perf_counter() - self.begin


def run(args) -> dict:
    config, (height, width), text_tokens, dtype = SIZES[args.size]
    torch.manual_seed(0)
    with torch.device(args.device):
        transformer = WanTransformer3DModel(**config)
    transformer = cast_like_from_pretrained(transformer, dtype).eval() if dtype != torch.float32 else transformer.eval()
    embeds = torch.randn(1, text_tokens, config["text_dim"], device=args.device, dtype=dtype)
    target = transformer
    if args.vae:  # a pipeline-like holder: stream() decodes through its vae
        vae = torch.nn.Module.to(AutoencoderKLWan(**VAES[args.size]), args.device, dtype).eval()  # none kept in fp32
        target = SimpleNamespace(transformer=transformer, vae=vae, scheduler=None)
    handles = [accelerate(transformer, args.recipe)] if args.recipe else []  # before compile, as accelerate orders
    if args.compile:
        handles.append(get_technique("compile").apply(transformer, get_technique("compile").config()))
    policy, kv_format = make_policy(args), KVFormatConfig(format=args.kv_format)
    call = {"frames_per_chunk": args.frames_per_chunk, "steps_per_chunk": args.steps_per_chunk, "policy": policy,
            "kv_format": kv_format, "height": height, "width": width,
            "scheduler": FlowMatchEulerDiscreteScheduler(shift=5.0),  # Self-Forcing's shift
            "decode": args.vae}

    for _ in stream(target, embeds, chunks=2, **call):  # warm-up (and compilation)
        pass

    latent_frames = math.ceil(args.seconds * VIDEO_FPS / VIDEO_PER_LATENT)
    chunks = math.ceil(latent_frames / args.frames_per_chunk)
    chunks_per_minute = max(1, round(60 * VIDEO_FPS / VIDEO_PER_LATENT / args.frames_per_chunk))
    cuda = args.device.startswith("cuda")
    clock, peaks, kv_by_minute, chunk_ends = Clock(args.device), [], [], []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    clock.start()
    for chunk in stream(target, embeds, chunks=chunks, **call):
        chunk_ends.append(clock.elapsed())  # syncs: the chunk is done when it is handed out
        last_of_minute = (chunk.index + 1) % chunks_per_minute == 0 or chunk.index == chunks - 1
        if last_of_minute:
            kv_by_minute.append(chunk.kv_bytes)
            if cuda:
                peaks.append(torch.cuda.max_memory_allocated() / 2**30)
                torch.cuda.reset_peak_memory_stats()
    for handle in reversed(handles):
        handle.remove()

    total, generated = chunk_ends[-1], chunks * args.frames_per_chunk
    steady = (total - chunk_ends[0]) if chunks > 1 else float("nan")
    return {
        "size": args.size, "device": torch.cuda.get_device_name() if cuda else "cpu",
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "latent": {"height": height, "width": width}, "policy": str(policy), "kv_format": args.kv_format,
        "compile": args.compile, "recipe": args.recipe, "vae_decode": args.vae,
        "frames_per_chunk": args.frames_per_chunk, "steps_per_chunk": args.steps_per_chunk,
        "seconds_of_video": args.seconds, "chunks": chunks, "latent_frames": generated,
        "video_frames": generated * VIDEO_PER_LATENT,
        "first_chunk_s": chunk_ends[0], "total_s": total,
        "latent_fps": generated / total, "video_fps": generated * VIDEO_PER_LATENT / total,
        "steady_video_fps": (generated - args.frames_per_chunk) * VIDEO_PER_LATENT / steady if chunks > 1 else None,
        "chunk_s": [b - a for a, b in zip([0.0, *chunk_ends], chunk_ends)],
        "peak_memory_gib_by_minute": peaks, "kv_bytes_by_minute": kv_by_minute,
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=list(SIZES), default="real")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--policy", choices=["full", "window", "sink-window"], default="sink-window")
    parser.add_argument("--sink", type=int, default=3, help="sink-window: first latent frames kept")
    parser.add_argument("--window", type=int, default=12, help="window, sink-window: recent latent frames kept")
    parser.add_argument("--cap-frames", type=int, default=120, help="full: most latent frames cached")
    parser.add_argument("--kv-format", choices=list(FORMATS), default="native")
    parser.add_argument("--compile", action="store_true", help="regional torch.compile of the blocks (cadence's)")
    parser.add_argument("--recipe", default=None,
                        help="bit-level terms and attention-backend (e.g. \"attention-backend(backend='sage') + fp8\"), "
                             "applied with cadence.accelerate; the KV terms are the options above")
    parser.add_argument("--vae", action="store_true", help="also decode each chunk with Wan2.1's VAE as it comes")
    parser.add_argument("--seconds", type=float, default=120.0, help="seconds of video at 16 frames a second")
    parser.add_argument("--frames-per-chunk", type=int, default=3)
    parser.add_argument("--steps-per-chunk", type=int, default=4)
    parser.add_argument("--out", default=None, help="write the result as JSON here too")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("--device cuda: no GPU here; the CPU check is --size tiny --device cpu")
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
