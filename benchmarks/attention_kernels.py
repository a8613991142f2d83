"""Block-sparse attention kernels at Wan2.1-1.3B's real size (480p x 81 frames: B=1, H=12,
S=32760, D=128, bf16), on one GPU.

For each density of kept 128 x 128 blocks (random masks, the diagonal always kept; plus a
"local window" mask keeping each query block's nearest key blocks), the same mask feeds
FlexAttention (torch.compile, a BlockMask from the same kv_num_blocks / kv_indices; default
kernel options and a couple of variants) and cadence's Triton kernel; dense SDPA (cuDNN,
flash) is the baseline and ``ideal = density x cuDNN dense``. The low-bit pair (issue 21,
item 2) is timed on the same masks: cadence's block-sparse SageAttention kernel with INT8 or
FP8 Q·K and FP8 P·V (``sage-sparse int8`` / ``fp8``, quantization included), next to the
dense sage kernel (``sage_int8`` / ``sage_fp8`` under "dense"); its ideal is density x dense sage. Also timed: turning a
(B, H, nq, nk) bool block mask into kv_num_blocks / kv_indices and a BlockMask. Each sparse
kernel is checked against the other (and the Triton kernel against the PyTorch reference
on one head) so speed is not bought with wrong results. ``--sweep`` also times a table of
Triton kernel configs at density 0.1 (tuning).

    PYTHONPATH=src python benchmarks/attention_kernels.py --out $OUT/attention_kernels.json

Needs cadence importable (diffusers carried as a wheel on the GPU machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

DENSITIES = [1.0, 0.5, 0.25, 0.1, 0.05]
FLEX_VARIANTS = {
    "flex": None,  # default kernel options
    "flex[128x128,w8,s3]": {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3},
    "flex[128x64,w8,s3]": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
}


SAGE_FORMATS = ("int8", "fp8")  # the Q·K format; P·V in FP8 for both


def load_sage():
    """cadence's SageAttention kernels (dense and block-sparse), where the GPU runs them."""
    from cadence.accel.attention import _sage_triton

    return _sage_triton if _sage_triton.supported(torch.device("cuda"), qk_format="fp8") else None


def load_kernel():
    """The Triton kernel module, with block_mask.kv_blocks as its mask converter."""
    from cadence.accel.attention import _triton, block_mask

    _triton.dense_to_kv_blocks = block_mask.kv_blocks
    return _triton


def cuda_ms(fn, reps: int, warmup: int) -> float:
    """Median of ``reps`` CUDA-event timings after ``warmup`` calls. K and V (200 MB here)
    are larger than L2, so back-to-back calls do not run from a warm cache."""
    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():  # --device cpu: a dry run of the script, not a measurement
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1000)
        return statistics.median(times)
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def random_blocks(batch, heads, blocks, density, generator, device):
    """(B, H, nq, nk) bool: each row keeps the same number of blocks, the diagonal first,
    the rest at random."""
    keep = min(blocks, max(1, round(density * blocks)))
    score = torch.rand(batch, heads, blocks, blocks, generator=generator, device=device)
    score = score + 2 * torch.eye(blocks, device=device)  # the diagonal sorts first
    top = score.topk(keep, dim=-1).indices
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, top, True)


def window_blocks(batch, heads, blocks, density, device):
    """Each query block keeps its nearest key blocks by |i - j| (ties: lower index)."""
    keep = min(blocks, max(1, round(density * blocks)))
    index = torch.arange(blocks, device=device)
    distance = (index[:, None] - index[None, :]).abs().float() + index[None, :] / (2 * blocks)
    top = distance.topk(keep, dim=-1, largest=False).indices
    mask = torch.zeros(blocks, blocks, dtype=torch.bool, device=device).scatter_(-1, top, True)
    return mask.expand(batch, heads, blocks, blocks).contiguous()


def block_mask_for_flex(num, idx, seq, block):
    from torch.nn.attention.flex_attention import BlockMask
    try:
        return BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=block, seq_lengths=(seq, seq))
    except TypeError:  # torch without seq_lengths
        return BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=block)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=32760)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--device", default="cuda", help="cpu: a dry run under TRITON_INTERPRET=1 (use a tiny --seq)")
    parser.add_argument("--reps", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-flex-variants", action="store_true", help="FlexAttention with default options only")
    parser.add_argument("--sweep", action="store_true", help="also time a table of Triton configs at density 0.1")
    parser.add_argument("--sweep-budget", type=float, default=90.0, help="seconds; later configs are skipped")
    parser.add_argument("--out", default=os.path.join(os.environ["OUT"], "attention_kernels.json")
                        if os.environ.get("OUT") else "attention_kernels.json")
    args = parser.parse_args()
    began = time.time()
    kernel = load_kernel()
    import triton

    device = torch.device(args.device)
    for name in ("cache_size_limit", "recompile_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, name):  # one compile per flex variant and mask kind
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    batch, heads, seq, dim, block = 1, args.heads, args.seq, args.dim, args.block
    blocks = math.ceil(seq / block)
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq, dim, generator=generator, device=device, dtype=torch.bfloat16)
               for _ in range(3))
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "triton": triton.__version__, "command": " ".join(sys.argv),
        "shape": dict(B=batch, H=heads, S=seq, D=dim, block=block, dtype="bfloat16"),
        "triton_config": dataclasses.asdict(kernel.default_config(dim, block, device)),
        "dense": {}, "sparse": [], "mask_construction": {}, "checks": {}, "failures": {},
        "sweep": [], "sweep_d64": [],
    }

    def save():
        result["wall_s"] = round(time.time() - began, 1)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))

    def timed(label, fn):
        try:
            return cuda_ms(fn, args.reps, args.warmup)
        except Exception as error:  # noqa: BLE001 - record and go on: one failing variant is a finding
            first_line = str(error).splitlines()[0][:300] if str(error) else ""
            result["failures"][label] = f"{type(error).__name__}: {first_line}"
            print(f"  {label} failed: {result['failures'][label]}", flush=True)
            return None

    with torch.no_grad():  # no logsumexp output from FlexAttention
        for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
            def dense(backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v)
            result["dense"][name] = timed(name, dense)
            print(f"{name}: {result['dense'][name]} ms", flush=True)
        cudnn = result["dense"]["sdpa_cudnn"] or result["dense"]["sdpa_flash"]
        sage = load_sage() if device.type == "cuda" else None
        if sage is not None:
            for fmt in SAGE_FORMATS:
                result["dense"][f"sage_{fmt}"] = timed(f"sage_{fmt}", lambda fmt=fmt: sage.sage_attention(
                    q, k, v, qk_format=fmt, pv_format="fp8"))
                print(f"sage_{fmt}: {result['dense'][f'sage_{fmt}']} ms", flush=True)

        from torch.nn.attention.flex_attention import flex_attention
        flex = torch.compile(flex_attention, dynamic=False)
        variants = {"flex": None} if args.no_flex_variants else FLEX_VARIANTS

        masks = [(f"random {d}", random_blocks(batch, heads, blocks, d, generator, device)) for d in DENSITIES]
        masks.append(("window 0.1", window_blocks(batch, heads, blocks, 0.1, device)))
        tuned = None
        if args.sweep:
            tuned = sweep(kernel, q, k, v, masks[DENSITIES.index(0.1)][1], block, args, result, save)
            dim64 = [x[..., :64].contiguous() for x in (q, k, v)]
            sweep(kernel, *dim64, masks[DENSITIES.index(0.1)][1], block, args, result, save, key="sweep_d64")
        for label, dense_mask in masks:
            num, idx = kernel.dense_to_kv_blocks(dense_mask)
            density = dense_mask.float().mean().item()
            row = {"mask": label, "density": round(density, 4), "ideal_ms": density * cudnn if cudnn else None}
            t0 = time.time()
            row["triton"] = timed(f"triton {label}", lambda: kernel.block_sparse_attention(q, k, v, num, idx, block))
            compile_s = {"triton": round(time.time() - t0, 1)}
            if tuned:
                row["triton[tuned]"] = timed(f"triton[tuned] {label}",
                                             lambda: kernel._launch(q, k, v, num, idx, block, config=tuned))
            if sage is not None:
                for fmt in SAGE_FORMATS:
                    row[f"sage-sparse {fmt}"] = timed(f"sage-sparse {fmt} {label}", lambda fmt=fmt: (
                        sage.sparse_sage_attention(q, k, v, num, idx, block, qk_format=fmt, pv_format="fp8")))
                    dense_sage = result["dense"].get(f"sage_{fmt}")
                    if row[f"sage-sparse {fmt}"] and dense_sage:
                        # its ideal: density x the dense sage kernel of the same format (not cuDNN's)
                        row[f"sage-sparse {fmt}_vs_ideal"] = round(row[f"sage-sparse {fmt}"] / (density * dense_sage), 2)
            bm = block_mask_for_flex(num, idx, seq, block)
            for name, options in variants.items():
                t0 = time.time()
                row[name] = timed(f"{name} {label}", lambda: flex(q, k, v, block_mask=bm, kernel_options=options))
                compile_s[name] = round(time.time() - t0, 1)
            if label == "random 0.1" and sage is not None:  # the low-bit pair against its float32 reference, head 0
                for fmt in SAGE_FORMATS:
                    got = sage.sparse_sage_attention(q, k, v, num, idx, block, qk_format=fmt, pv_format="fp8")
                    want = sage.reference_sparse_sage_attention(q[:, :1], k[:, :1], v[:, :1], num[:, :1],
                                                                idx[:, :1], block, qk_format=fmt, pv_format="fp8",
                                                                block_m=min(64, block), block_n=min(128, block))
                    error = (got[:, :1].float() - want.float()).norm() / want.float().norm()
                    result["checks"][f"sage-sparse {fmt} vs reference (rel. L2, head 0)"] = round(error.item(), 5)
            if label == "random 0.1":
                # Layout as attention processors hold it: (B, S, H, D) permuted to (B, H, S, D).
                qp, kp, vp = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
                row["triton (B,S,H,D) view"] = timed(
                    "triton view", lambda: kernel.block_sparse_attention(qp, kp, vp, num, idx, block))
                check(kernel, flex, variants, q, k, v, num, idx, bm, block, result)
                masks_time(kernel, dense_mask, seq, block, args, result)
            for name in ["triton", "triton[tuned]", *variants]:
                if row.get(name) and row["ideal_ms"]:
                    row[f"{name}_vs_ideal"] = round(row[name] / row["ideal_ms"], 2)
            row["timed_s_incl_compile"] = compile_s
            result["sparse"].append(row)
            print(f"{label}: " + ", ".join(f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}"
                                           for key, value in row.items() if key != "mask"), flush=True)
            save()
    if device.type == "cuda":
        result["cadence_calls"] = cadence_calls(q, k, v, timed)
        save()

    save()
    print_table(result)
    print(f"wrote {args.out} ({result['wall_s']} s)")


def check(kernel, flex, variants, q, k, v, num, idx, bm, block, result):
    """Max abs differences at one density: Triton vs each Flex variant, and Triton vs the
    float32 PyTorch reference on one head (the token mask of all heads would be 13 GB)."""
    ours = kernel.block_sparse_attention(q, k, v, num, idx, block).float()
    for name, options in variants.items():
        try:
            theirs = flex(q, k, v, block_mask=bm, kernel_options=options).float()
            result["checks"][f"triton vs {name}"] = (ours - theirs).abs().max().item()
        except Exception as error:  # noqa: BLE001
            result["checks"][f"triton vs {name}"] = f"{type(error).__name__}"
    one = slice(0, 1)
    expected = kernel.reference_block_sparse_attention(q[:, one], k[:, one], v[:, one], num[:, one], idx[:, one], block)
    result["checks"]["triton vs reference (head 0)"] = (ours[:, one] - expected.float()).abs().max().item()
    # bf16 output: one rounding step of values around 0.1-1 is ~4e-3.
    print("checks:", result["checks"], flush=True)


def cadence_calls(q, k, v, timed) -> dict:
    """One self-attention call as cadence makes it at this size: Wan's 21 x 30 x 52 latent
    tokens reordered into 2 x 8 x 8 tiles, the pattern's block mask, the kernel, the
    output put back in raster order; and, apart, what building each dynamic pattern's mask
    costs per call (the static ones are built once)."""
    from cadence.accel.attention import block_mask, kernels
    from cadence.accel.attention.heads import route
    from cadence.accel.attention.patterns import Geometry, top_blocks
    from cadence.accel.attention.window import WindowConfig
    from cadence.models import TokenLayout

    geometry = Geometry(TokenLayout(21, 30, 52), 128)
    if geometry.layout.tokens != q.shape[-2]:
        return {"skipped": f"sequence {q.shape[-2]} is not Wan's 32,760"}
    order, inverse = geometry.order.to(q.device), geometry.inverse.to(q.device)
    calls = {}
    for density in (0.5, 0.25, 0.1):
        mask, _ = WindowConfig().pattern(geometry, density, q, k, None)
        sparse = block_mask.BlockSparse(mask, 128, geometry.layout.tokens)
        for backend in ("triton", "flex"):
            def call():
                qp, kp, vp = (x.index_select(-2, order) for x in (q, k, v))
                return kernels.attend(qp, kp, vp, sparse, backend=backend).index_select(-2, inverse)

            calls[f"window {density} {backend}, reorder included"] = timed(f"cadence window {backend}", call)
    calls["reorder q, k, v and output"] = timed("reorder", lambda: [x.index_select(-2, order) for x in (q, k, v, q)])
    calls["mask: topk 0.1"] = timed("topk mask", lambda: top_blocks(q, k, 128, 0.1))
    calls["mask: svg 0.1 (spatial, temporal)"] = timed(
        "svg mask", lambda: route(("spatial", "temporal"), geometry, 0.1, q, k, None, 64))
    calls["mask: router 0.1 (window, temporal, topk)"] = timed(
        "router mask", lambda: route(("window", "temporal", "topk"), geometry, 0.1, q, k, None, 64))
    print("cadence calls (ms):", calls, flush=True)
    return calls


def masks_time(kernel, dense_mask, seq, block, args, result):
    """Building the kernels' inputs from a (B, H, nq, nk) bool block mask."""
    def both():
        num, idx = kernel.dense_to_kv_blocks(dense_mask)
        return block_mask_for_flex(num, idx, seq, block)

    from torch.nn.attention.flex_attention import BlockMask

    num, idx = kernel.dense_to_kv_blocks(dense_mask)
    result["mask_construction"] = {
        "shape": list(dense_mask.shape),
        "dense_to_kv_blocks_ms": cuda_ms(lambda: kernel.dense_to_kv_blocks(dense_mask), args.reps, args.warmup),
        "BlockMask.from_kv_blocks_ms": cuda_ms(lambda: block_mask_for_flex(num, idx, seq, block), args.reps,
                                               args.warmup),
        "both_ms": cuda_ms(both, args.reps, args.warmup),
    }
    try:  # inference needs no transposed (q-block) indices, which are most of from_kv_blocks' cost
        result["mask_construction"]["BlockMask.from_kv_blocks(compute_q_blocks=False)_ms"] = cuda_ms(
            lambda: BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=block, seq_lengths=(seq, seq),
                                             compute_q_blocks=False), args.reps, args.warmup)
    except Exception as error:  # noqa: BLE001 - a torch without the argument
        result["failures"]["from_kv_blocks(compute_q_blocks=False)"] = f"{type(error).__name__}: {error}"
    print("mask construction:", result["mask_construction"], flush=True)


def sweep(kernel, q, k, v, dense_mask, block, args, result, save, key="sweep"):
    """Triton configs at density 0.1, each one's error measured against the float32
    reference on head 0. Returns the fastest config whose mean error is within 1.25x of
    the default's, if it is not the default."""
    config = kernel.KernelConfig
    if key == "sweep":  # D = 128
        table = [config(128, 128, 8, 2, tma=False), config(128, 128, 8, 2), config(128, 128, 8, 3, tma=False),
                 config(128, 64, 8, 3), config(128, 64, 8, 2, tma=False), config(64, 64, 4, 3), config(64, 64, 4, 2),
                 config(64, 64, 4, 2, tma=False), config(128, 128, 16, 2, tma=False)]
    else:  # D = 64
        table = [config(128, 64, 8, 3), config(128, 64, 4, 3), config(128, 128, 8, 2, tma=False),
                 config(128, 128, 8, 3), config(64, 64, 4, 3)]
    num, idx = kernel.dense_to_kv_blocks(dense_mask)
    head = slice(0, 1)
    expected = kernel.reference_block_sparse_attention(q[:, head], k[:, head], v[:, head], num[:, head],
                                                       idx[:, head], block).float()

    def error(out):
        diff = (out[:, head].float() - expected).abs()
        return diff.mean().item(), diff.max().item()

    default = kernel.default_config(q.shape[-1], block, q.device)
    base_err, _ = error(kernel.block_sparse_attention(q, k, v, num, idx, block))
    entries, start = [], time.time()
    for cfg in table:
        entry = dataclasses.asdict(cfg)
        if time.time() - start > args.sweep_budget:
            entry["skipped"] = "sweep budget spent"
        else:
            try:
                t0 = time.time()
                out = kernel._launch(q, k, v, num, idx, block, config=cfg)
                torch.cuda.synchronize()
                entry["compile_s"] = round(time.time() - t0, 1)
                entry["err_mean"], entry["err_max"] = error(out)
                entry["ms"] = cuda_ms(lambda: kernel._launch(q, k, v, num, idx, block, config=cfg), args.reps,
                                      args.warmup)
                entries.append((entry["ms"], entry["err_mean"], cfg))
            except Exception as error_:  # noqa: BLE001
                entry["error"] = f"{type(error_).__name__}: {str(error_).splitlines()[0][:200] if str(error_) else ''}"
        result[key].append(entry)
        print(key, entry, flush=True)
        save()
    result[f"{key}_default_err_mean"] = base_err
    good = sorted((ms, cfg) for ms, err, cfg in entries if err <= 1.25 * base_err + 1e-6)
    if not good or good[0][1] == default:
        return None
    result[f"{key}_tuned"] = dataclasses.asdict(good[0][1])
    return good[0][1]


def print_table(result):
    rows = result["sparse"]
    names = list(dict.fromkeys(key for row in rows for key in row if key not in (
        "mask", "density", "ideal_ms", "timed_s_incl_compile") and not key.endswith("_vs_ideal")))
    print(f"\n{result['device']}, torch {result['torch']}, triton {result['triton']}, {result['shape']}")
    print("dense: " + ", ".join(f"{name} {ms:.3f} ms" for name, ms in result["dense"].items() if ms))
    print(f"{'mask':<12}{'density':>8}{'ideal':>8}" + "".join(f"{name:>22}" for name in names))
    for row in rows:
        cells = []
        for name in names:
            ms, ratio = row.get(name), row.get(f"{name}_vs_ideal")
            cells.append(f"{ms:8.3f} ({ratio:.2f}x)" if ms and ratio else f"{ms:8.3f}" if ms else
                         "failed" if name in row else "-")
        ideal = f"{row['ideal_ms']:8.3f}" if row["ideal_ms"] else "       -"
        print(f"{row['mask']:<12}{row['density']:>8.3f}{ideal}" + "".join(f"{cell:>22}" for cell in cells))
    print("(ms, and in brackets the ratio to ideal = density x cuDNN dense; for sage-sparse, density x dense sage)")
    for key in ("sweep", "sweep_d64"):
        for entry in result.get(key, []):
            print(key, {name: round(value, 6) if isinstance(value, float) else value for name, value in entry.items()})
        if result.get(f"{key}_tuned"):
            print(f"{key} tuned:", result[f"{key}_tuned"])


if __name__ == "__main__":
    main()
