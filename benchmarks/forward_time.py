"""How long does one computed forward of the Wan2.1-1.3B-size transformer take (480p x 81
frames: 21 x 60 x 104 latents, 32,760 tokens, bf16, random weights) under each recipe, for
one source tree? Run it on two trees in one call to compare them (benchmarks/README.md).

    python3 benchmarks/forward_time.py SRC --recipes "compile + attention-backend(backend='sage')" ...

Each recipe: applied, warmed up (compilation included), then the median of --reps forwards
timed with CUDA events; the last line is a JSON object of recipe -> ms."""

import argparse
import json
import statistics
import sys

import torch


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="the source tree's src folder (the one holding cadence/)")
    parser.add_argument("--recipes", nargs="+", default=["baseline"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--layers", type=int, default=30, help="Wan2.1-1.3B has 30")
    args = parser.parse_args()
    sys.path.insert(0, args.src)
    import cadence
    from diffusers import WanTransformer3DModel

    torch._dynamo.config.cache_size_limit = 64
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                                  in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960,
                                  num_layers=args.layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                  rope_max_seq_len=1024).cuda().to(torch.bfloat16).eval()
    g = torch.Generator("cuda").manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 16, 21, 60, 104, device="cuda", dtype=torch.bfloat16, generator=g),
                  timestep=torch.tensor([700.0], device="cuda"),
                  encoder_hidden_states=torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16, generator=g),
                  return_dict=False)
    times = {}
    for recipe in args.recipes:
        acceleration = None if recipe == "baseline" else cadence.accelerate(model, recipe)
        with torch.no_grad():
            for _ in range(2):
                model(**inputs)
            samples = []
            for _ in range(args.reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                model(**inputs)
                end.record()
                torch.cuda.synchronize()
                samples.append(start.elapsed_time(end))
        if acceleration is not None:
            acceleration.remove()
        times[recipe] = round(statistics.median(samples), 1)
        print(f"{recipe}: {times[recipe]} ms (spread {min(samples):.1f}-{max(samples):.1f})", flush=True)
    print(json.dumps(times))


if __name__ == "__main__":
    main()
