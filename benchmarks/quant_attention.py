"""Low-precision (SageAttention-style) dense attention at Wan2.1-1.3B's real size (480p x 81
frames: B=1, H=12, S=32760, D=128, bf16) on one GPU.

Timed with CUDA events after warm-up (median of --reps): bf16 SDPA through cuDNN and
flash, and cadence's Triton kernel in each format (int8 / fp8 QK x fp8 / bf16 PV), with
the quantization of q, k, v included ("full") and alone ("quant"), and the attention
kernel alone on quantized inputs ("kernel"). Accuracy: cosine similarity, relative L2 and
max abs error against float32 attention on 1024 random query rows (all keys), on random
inputs and on structured ones (below), with bf16 cuDNN's own error beside them; and each
format against its PyTorch reference (reference_sage_attention) at S=1000. ``--sweep``
times a table of kernel configs (tiles, warps, stages, exp2 / int8 tricks), kernel only.

Structured inputs: tokens on Wan's latent grid (21 frames x 30 x 52 patches = 32760),
q and k the same random Fourier features of the (t, y, x) position (so each query favours
nearby keys; half the heads sharply, half broadly), plus noise, K with a few large channel
biases (the outliers that smoothing removes) and V with log-normal channel scales.

Self-contained: it loads src/cadence/accel/attention/_sage_triton.py by path (torch and
triton only), so cadence's own dependencies need not be installed.

    python benchmarks/quant_attention.py --sweep --out $OUT/quant_attention.json
"""

from __future__ import annotations

import argparse
import importlib.util
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

KERNEL_PATH = Path(__file__).resolve().parents[1] / "src/cadence/accel/attention/_sage_triton.py"
FORMATS = [("int8", "fp8"), ("fp8", "fp8"), ("int8", "bf16"), ("fp8", "bf16")]
LATENT_GRID = (21, 30, 52)  # Wan2.1 480p x 81 frames after the VAE (4x8x8) and 1x2x2 patches


def load_kernel():
    spec = importlib.util.spec_from_file_location("cadence_quant_attention_triton", KERNEL_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def cuda_ms(fn, reps: int, warmup: int) -> float:
    """Median of ``reps`` CUDA-event timings after ``warmup`` calls. K and V (100 MB each
    here) are larger than L2, so back-to-back calls do not run from a warm cache."""
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


def structured_inputs(batch, heads, seq, dim, generator, device):
    """(q, k, v) bf16 (B, H, S, D): see the module docstring."""
    frames, height, width = LATENT_GRID
    index = torch.arange(seq, device=device)
    position = torch.stack([index // (height * width), index // width % height, index % width], -1).float()
    position = position / torch.tensor([frames, height, width], device=device)  # (S, 3) in [0, 1)
    randn = lambda *shape: torch.randn(*shape, generator=generator, device=device)  # noqa: E731
    # A token's logit with itself: 12 on even heads (~250 tokens share the mass), 4 on odd ones.
    self_logit = torch.where(torch.arange(heads, device=device) % 2 == 0, 12.0, 4.0)
    freqs = randn(heads, 3, dim // 2) * 8.0  # (H, 3, D/2)
    angle = position[None] @ freqs  # (H, S, D/2)
    # q.k / sqrt(D) = self_logit * mean over frequencies of cos(w . (p_q - p_k))
    amplitude = (self_logit * math.sqrt(dim) / (dim // 2)).sqrt()[:, None, None]
    features = torch.cat([angle.cos(), angle.sin()], -1) * amplitude  # (H, S, D)
    q = features + 0.3 * randn(batch, heads, seq, dim)
    bias = torch.zeros(heads, 1, dim, device=device)
    bias[:, :, :4] = 8.0 * randn(heads, 1, 4)  # K's channel outliers, shared by every token
    k = features + 0.3 * randn(batch, heads, seq, dim) + bias
    v = randn(batch, heads, seq, dim) * torch.exp(0.7 * randn(heads, 1, dim))
    return tuple(x.to(torch.bfloat16).contiguous() for x in (q, k, v))


def exact_rows(q, k, v, rows, scale=None):
    """float32 attention of the query rows ``rows`` over all keys: (B, H, len(rows), D)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q[:, :, rows].float() @ k.float().transpose(-1, -2)) * scale
    return torch.softmax(logits, dim=-1) @ v.float()


def errors(out, expected) -> dict:
    out, expected = out.float(), expected.float()
    return dict(cosine=F.cosine_similarity(out.flatten(), expected.flatten(), dim=0).item(),
                rel_l2=((out - expected).norm() / expected.norm()).item(),
                max_abs=(out - expected).abs().max().item())


def _sweep_plan():
    """(formats, KernelConfig fields) to time. Tiles x stages x pipelining and single-option
    variants were swept before (the table in _sage_triton.default_config); this is
    the fastest of those again, the options not yet combined, and register caps that fit
    more programs per SM."""
    main = ("int8", "fp8")
    base = dict(block_m=64, block_n=128, num_warps=4, num_stages=3)
    wide = dict(block_m=128, block_n=128, num_warps=8, num_stages=3)
    plan = [(main, fields) for fields in (
        base, base | dict(magic_int8=True), base | dict(two_level=False),
        base | dict(two_level=False, pipeline=True), base | dict(num_stages=2, two_level=False, pipeline=True),
        wide | dict(two_level=False, pipeline=True), wide | dict(num_stages=4, two_level=False, pipeline=True),
        base | dict(num_stages=2, maxnreg=168), base | dict(num_stages=2, maxnreg=168, pipeline=True),
        base | dict(num_stages=2, maxnreg=128), base | dict(maxnreg=168),
        dict(block_m=64, block_n=64, num_warps=4, num_stages=3, maxnreg=128),
        wide | dict(maxnreg=128), wide | dict(num_stages=4, maxnreg=128),
        base | dict(magic_int8=True, two_level=False),
    )]
    plan += [(("fp8", "fp8"), fields) for fields in (base, base | dict(two_level=False),
                                                      base | dict(two_level=False, pipeline=True),
                                                      base | dict(num_stages=2, maxnreg=168))]
    narrow = dict(block_m=128, block_n=64, num_warps=8, num_stages=3)
    for formats in [("int8", "bf16"), ("fp8", "bf16")]:
        plan += [(formats, fields) for fields in (narrow, narrow | dict(num_stages=2, maxnreg=128),
                                                  dict(block_m=64, block_n=64, num_warps=4, num_stages=3))]
    return plan


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=32760)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--check-rows", type=int, default=1024, help="query rows compared with float32")
    parser.add_argument("--sweep", action="store_true", help="also time a table of kernel configs")
    parser.add_argument("--budget", type=float, default=240.0,
                        help="seconds since start after which no further sweep config is started")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run under TRITON_INTERPRET=1 (tiny --seq)")
    parser.add_argument("--out", default=os.path.join(os.environ["OUT"], "quant_attention.json")
                        if os.environ.get("OUT") else "quant_attention.json")
    args = parser.parse_args()
    began = time.time()
    kernel = load_kernel()
    import triton

    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference stays float32
    device = torch.device(args.device)
    batch, heads, seq, dim = 1, args.heads, args.seq, args.dim
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq, dim, generator=generator, device=device, dtype=torch.bfloat16)
               for _ in range(3))
    structured = structured_inputs(batch, heads, seq, dim, generator, device)
    rows = torch.randperm(seq, generator=generator, device=device)[:args.check_rows].sort().values
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "capability": list(torch.cuda.get_device_capability()) if device.type == "cuda" else None,
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "command": " ".join(sys.argv),
        "shape": dict(B=batch, H=heads, S=seq, D=dim, dtype="bfloat16"),
        "default_configs": {}, "dense": {}, "formats": {}, "accuracy": {}, "vs_reference": {},
        "sweep": [], "best_swept": {}, "failures": {},
    }

    def save():
        result["wall_s"] = round(time.time() - began, 1)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))

    def attempt(label, fn):
        try:
            return fn()
        except Exception as error:  # noqa: BLE001 - record and go on: one failing variant is a finding
            first_line = str(error).strip().splitlines()[-1][:300] if str(error).strip() else ""
            result["failures"][label] = f"{type(error).__name__}: {first_line}"
            print(f"  {label} failed: {result['failures'][label]}", flush=True)
            return None

    def timed(label, fn):
        return attempt(label, lambda: cuda_ms(fn, args.reps, args.warmup))

    with torch.no_grad():
        for name, backend in (("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_flash", SDPBackend.FLASH_ATTENTION)):
            def dense(backend=backend, q=q, k=k, v=v):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v)
            result["dense"][name] = timed(name, dense)
            print(f"{name}: {result['dense'][name]} ms", flush=True)
        cudnn = result["dense"]["sdpa_cudnn"] or result["dense"]["sdpa_flash"]

        # Accuracy: float32 on the sampled rows; bf16 cuDNN is the yardstick.
        for input_name, (qi, ki, vi) in (("random", (q, k, v)), ("structured", structured)):
            expected = exact_rows(qi, ki, vi, rows)
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                bf16 = attempt("cudnn accuracy", lambda: F.scaled_dot_product_attention(qi, ki, vi)[:, :, rows])
            table = {"bf16 cudnn": errors(bf16, expected)} if bf16 is not None else {}
            for qk_format, pv_format in FORMATS:
                label = f"{qk_format}/{pv_format}"
                out = attempt(f"{label} {input_name}", lambda: kernel.sage_attention(
                    qi, ki, vi, qk_format=qk_format, pv_format=pv_format)[:, :, rows])
                if out is not None:
                    table[label] = errors(out, expected)
            result["accuracy"][input_name] = table
            del expected
            print(f"accuracy ({input_name}):", {key: {m: round(x, 5) for m, x in value.items()}
                                                 for key, value in table.items()}, flush=True)
            save()

        # Against the PyTorch reference (same quantization) at a size its float32 logits fit.
        small = [x[:, :2, :1000].contiguous() for x in structured]
        for qk_format, pv_format in FORMATS:
            label = f"{qk_format}/{pv_format}"
            got = attempt(f"{label} vs reference", lambda: (
                kernel.sage_attention(*small, qk_format=qk_format, pv_format=pv_format),
                kernel.reference_sage_attention(*small, qk_format=qk_format, pv_format=pv_format)))
            if got is not None:
                result["vs_reference"][label] = errors(*got)
        print("vs reference (S=1000):", {key: round(value["rel_l2"], 5)
                                         for key, value in result["vs_reference"].items()}, flush=True)

        # Speed: full (quantization included), quantization alone, kernel alone.
        for qk_format, pv_format in FORMATS:
            label = f"{qk_format}/{pv_format}"
            config = kernel.default_config(dim, device, qk_format, pv_format)
            result["default_configs"][label] = config.__dict__.copy()
            row = {}
            row["full_ms"] = timed(f"{label} full", lambda: kernel.sage_attention(
                q, k, v, qk_format=qk_format, pv_format=pv_format))
            quantize = lambda: kernel.quantize_qkv(q, k, v, qk_format=qk_format, pv_format=pv_format,  # noqa: E731
                                                   block_m=config.block_m, block_n=config.block_n)
            row["quant_ms"] = timed(f"{label} quant", quantize)
            quantized = attempt(f"{label} quantize", quantize)
            if quantized is not None:
                out = torch.empty_like(q)
                row["kernel_ms"] = timed(f"{label} kernel", lambda: kernel.attend_quantized(quantized, out, config))
            if row.get("full_ms") and cudnn:
                row["speedup_vs_cudnn"] = round(cudnn / row["full_ms"], 3)
                flops = 4 * batch * heads * seq * seq * dim
                row["tflops_full"] = round(flops / row["full_ms"] / 1e9, 1)
            result["formats"][label] = row
            print(f"{label}: {row}", flush=True)
            save()

        # Where the quantization time goes; a bf16 copy of q (read + write) as the yardstick.
        result["quant_parts"] = {
            "q+k int8 (pv bf16)": timed("quant q+k", lambda: kernel.quantize_qkv(q, k, v, pv_format="bf16")),
            "k column sums": timed("k sums", lambda: kernel._column_parts(k, None)),
            "k sums + v absmax": timed("kv stats", lambda: kernel._column_parts(k, v)),
            "q.clone()": timed("clone", lambda: q.clone()),
        }
        print("quantization parts (ms):", result["quant_parts"], flush=True)
        save()

        if args.sweep:
            sweep(kernel, q, k, v, rows, args, result, save, attempt, began)
            # The three fastest int8 / fp8 configs once more: the spread between runs.
            ranked = sorted((e for e in result["sweep"] if e["kernel_ms"] and e["formats"] == "int8/fp8"),
                            key=lambda e: e["kernel_ms"])[:3]
            for entry in ranked:
                config = kernel.KernelConfig(**entry["config"])
                quantized = kernel.quantize_qkv(q, k, v, block_m=config.block_m, block_n=config.block_n)
                out = torch.empty_like(q)
                entry["kernel_ms_again"] = timed("again", lambda: kernel.attend_quantized(quantized, out, config))
                print(f"again {describe(config)}: {entry['kernel_ms']:.3f} then {entry['kernel_ms_again']} ms",
                      flush=True)
            # The fastest swept config of each format, timed whole (quantization included).
            best = {}
            for entry in result["sweep"]:
                if entry["kernel_ms"] is not None and entry["kernel_ms"] < best.get(entry["formats"], (1e9,))[0]:
                    best[entry["formats"]] = (entry["kernel_ms"], entry["config"])
            for label, (_, fields) in best.items():
                qk_format, pv_format = label.split("/")
                config = kernel.KernelConfig(**fields)
                full = timed(f"{label} best full", lambda: kernel._launch(
                    q, k, v, qk_format=qk_format, pv_format=pv_format, config=config))
                result["best_swept"][label] = dict(config=fields, full_ms=full,
                                                   speedup_vs_cudnn=cudnn / full if full and cudnn else None)
                print(f"best swept {label}: {result['best_swept'][label]}", flush=True)
            save()

    save()
    print_table(result)
    print(f"wrote {args.out} ({result['wall_s']} s)")


def sweep(kernel, q, k, v, rows, args, result, save, attempt, began):
    """Kernel-only time of each config (quantized once per tile size), and its output's
    error on the sampled rows against float32 (a config that is fast but wrong shows)."""
    expected = exact_rows(q, k, v, rows)
    quantized_cache = {}
    out = torch.empty_like(q)
    for (qk_format, pv_format), fields in _sweep_plan():
        if time.time() - began > args.budget:
            result["sweep_skipped"] = result.get("sweep_skipped", 0) + 1
            continue
        config = kernel.KernelConfig(**fields)
        block_m, block_n = config.block_m, config.block_n
        label = f"{qk_format}/{pv_format} " + describe(config)
        key = (qk_format, pv_format, block_m, block_n)
        if key not in quantized_cache:
            quantized_cache.clear()  # one set at a time: 150 MB each
            quantized_cache[key] = attempt(f"sweep quantize {key}", lambda: kernel.quantize_qkv(
                q, k, v, qk_format=qk_format, pv_format=pv_format, block_m=block_m, block_n=block_n))
        quantized = quantized_cache[key]
        if quantized is None:
            continue
        t0 = time.time()
        ms = attempt(f"sweep {label}", lambda: cuda_ms(lambda: kernel.attend_quantized(quantized, out, config),
                                                      args.reps, args.warmup))
        entry = dict(formats=f"{qk_format}/{pv_format}", config=config.__dict__.copy(), kernel_ms=ms,
                     seconds_incl_compile=round(time.time() - t0, 1))
        if ms is not None:
            entry.update(errors(out[:, :, rows], expected))
        result["sweep"].append(entry)
        print(f"sweep {label}: {ms if ms is None else round(ms, 3)} ms"
              + (f" rel_l2={entry['rel_l2']:.4f}" if ms is not None else ""), flush=True)
        save()


def describe(config) -> str:
    c = config if isinstance(config, dict) else config.__dict__
    return (f"{c['block_m']}x{c['block_n']} w{c['num_warps']} s{c['num_stages']}"
            + "".join(f" {name}={c[name]}" for name, default in (("magic_int8", False), ("exp", "ftz"),
                      ("pipeline", False), ("two_level", True), ("warp_specialize", False), ("maxnreg", None))
                      if c.get(name, default) != default))


def print_table(result):
    shape = result["shape"]
    print(f"\n{result['device']}  torch {result['torch']}  triton {result['triton']}  {result['date']}")
    print(f"B={shape['B']} H={shape['H']} S={shape['S']} D={shape['D']} bf16; median of CUDA events")
    print(f"{'variant':<22}{'full ms':>9}{'quant ms':>10}{'kernel ms':>11}{'vs cuDNN':>10}"
          f"{'cos rnd':>10}{'relL2 rnd':>11}{'cos str':>10}{'relL2 str':>11}")
    accuracy = result["accuracy"]

    def acc(name, which, metric):
        value = accuracy.get(which, {}).get(name, {}).get(metric)
        return f"{value:.5f}" if value is not None else "-"

    cudnn = result["dense"].get("sdpa_cudnn")
    for name, ms in result["dense"].items():
        speed = f"{cudnn / ms:.2f}x" if cudnn and ms else "-"
        label = "bf16 cudnn" if name == "sdpa_cudnn" else None
        print(f"{name:<22}{'-' if ms is None else f'{ms:.3f}':>9}{'':>10}{'':>11}{speed:>10}"
              + (f"{acc(label, 'random', 'cosine'):>10}{acc(label, 'random', 'rel_l2'):>11}"
                 f"{acc(label, 'structured', 'cosine'):>10}{acc(label, 'structured', 'rel_l2'):>11}" if label else ""))
    for name, row in result["formats"].items():
        fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        speed = f"{row['speedup_vs_cudnn']:.2f}x" if row.get("speedup_vs_cudnn") else "-"
        print(f"{name:<22}{fmt(row.get('full_ms')):>9}{fmt(row.get('quant_ms')):>10}{fmt(row.get('kernel_ms')):>11}"
              f"{speed:>10}{acc(name, 'random', 'cosine'):>10}{acc(name, 'random', 'rel_l2'):>11}"
              f"{acc(name, 'structured', 'cosine'):>10}{acc(name, 'structured', 'rel_l2'):>11}")
    if result["sweep"]:
        print("\nsweep (kernel only):")
        for entry in sorted(result["sweep"], key=lambda e: e["kernel_ms"] or 1e9):
            ms = "failed" if entry["kernel_ms"] is None else f"{entry['kernel_ms']:.3f} ms"
            print(f"  {entry['formats']:<10} {describe(entry['config']):<48} {ms}"
                  + (f"  rel_l2 {entry['rel_l2']:.4f}" if entry.get("rel_l2") is not None else ""))
    for label, row in result.get("best_swept", {}).items():
        print(f"best swept {label}: {describe(row['config'])}: full {row['full_ms']} ms, "
              f"{row['speedup_vs_cudnn'] or 0:.2f}x cuDNN")
    if result["failures"]:
        print("\nfailures:", json.dumps(result["failures"], indent=1))


if __name__ == "__main__":
    main()
