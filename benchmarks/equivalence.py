"""Does a change of the source tree change outputs on the GPU? The same recipes, on the same
random Wan-shaped transformer (2 blocks, 12 heads of 128, 4,680 tokens, bf16), one forward
each, run by two source trees in two processes; then compared bit for bit.

The CPU tests cannot see the native paths (torch._scaled_mm, torch._int_mm, the Triton
kernels, inductor), so a refactor of them is checked here. Usage (benchmarks/README.md):

    git archive REV src/cadence | tar -x -C .carry/old --exclude='src/cadence/reference/checkpoints'
    python3 benchmarks/equivalence.py run .carry/old/src $OUT/old.safetensors
    python3 benchmarks/equivalence.py run src $OUT/new.safetensors
    python3 benchmarks/equivalence.py compare $OUT/old.safetensors $OUT/new.safetensors

``ONLY="compile + fp8;compile"`` runs those recipes alone (and the baseline). torch.compile is
not bit-deterministic from one process to the next: run a tree against itself to see its spread.
"""
import sys

import torch

RECIPES = ["baseline", "fp8", "int8(smooth=0)", "weight-int8", "weight-int4", "nvfp4", "mxfp4(rank=16)",
           "attention-backend(backend='sage')", "attention-backend(backend='sage-fp8')",
           "sparse-window(density=0.25, dense_fraction=0)", "sparse-topk(density=0.25, dense_fraction=0)",
           "sparse-router(density=0.25, dense_fraction=0)",
           "compile + fp8", "compile + attention-backend(backend='sage')"]


def run(src, out):
    import os

    if os.environ.get("ONLY"):
        RECIPES[:] = ["baseline"] + os.environ["ONLY"].split(";")
    sys.path.insert(0, src)
    import cadence
    from diffusers import WanTransformer3DModel
    from safetensors.torch import save_file

    torch._dynamo.config.cache_size_limit = 64
    torch.manual_seed(0)
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                                  in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960,
                                  num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                  rope_max_seq_len=1024).cuda().to(torch.bfloat16).eval()
    g = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(1, 16, 5, 60, 104, device="cuda", dtype=torch.bfloat16, generator=g)
    text = torch.randn(1, 64, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
    t = torch.tensor([700.0], device="cuda")
    results = {}
    for recipe in RECIPES:
        try:
            with torch.no_grad():
                if recipe == "baseline":
                    y = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
                else:
                    with cadence.accelerate(model, recipe):
                        y = model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
            results[recipe] = y.float().cpu().contiguous()
            print(f"{recipe}: ok, rel. to baseline {float((y.float().cpu() - results['baseline']).norm() / results['baseline'].norm()):.4f}"
                  if "baseline" in results and recipe != "baseline" else f"{recipe}: ok")
        except Exception as error:  # report and go on: the comparison names what is missing
            print(f"{recipe}: FAILED {type(error).__name__}: {error}")
    save_file(results, out)


def compare(a, b):
    from safetensors.torch import load_file

    old, new = load_file(a), load_file(b)
    for recipe in old:
        if recipe not in old or recipe not in new:
            print(f"{recipe:50s} missing in {'old' if recipe not in old else 'new'}")
            continue
        same = torch.equal(old[recipe], new[recipe])
        diff = float((old[recipe] - new[recipe]).abs().max())
        print(f"{recipe:50s} {'bit-identical' if same else f'DIFFERS (max abs {diff:.3g})'}")


if __name__ == "__main__":
    {"run": run, "compare": compare}[sys.argv[1]](*sys.argv[2:])
