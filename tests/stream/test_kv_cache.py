"""The KV cache of the sequence level: which frames each policy keeps, the memory it reports,
the round-trip bounds of its number formats, KV-relative RoPE against a masked bidirectional
reference, its refusals, and exact restoration."""

import pytest
import torch
import torch.nn.functional as F
from conftest import seeded_randn, text, tiny_flux, tiny_wan
from torch.overrides import TorchFunctionMode

from cadence.accel.attention.window import WindowConfig as SparseWindowConfig
from cadence.accel.attention.window import apply as apply_sparse_window
from cadence.accel.sequence import FullConfig, KVFormatConfig, SinkWindowConfig, WindowConfig
from cadence.accel.sequence._base import KV_CACHE, apply_format, apply_policy
from cadence.accel.sequence.formats import FORMATS, load

SIDE = 8  # pixels a side: 4 x 4 patches of 2 x 2, 16 tokens a frame
CHUNK = 3


# -- policies ---------------------------------------------------------------------------

@pytest.mark.parametrize("window", [1, 3, 5, 12])
def test_window_keeps_exactly_the_last_frames(window):
    policy, frames = WindowConfig(frames=window), []
    for chunk in range(10):
        frames = policy.keep(frames + list(range(chunk * CHUNK, (chunk + 1) * CHUNK)))
        written = (chunk + 1) * CHUNK
        assert frames == list(range(max(0, written - window), written))


@pytest.mark.parametrize("sink, window", [(1, 3), (3, 12), (3, 4), (5, 3)])
def test_sink_window_keeps_the_first_and_the_last_frames(sink, window):
    policy, frames = SinkWindowConfig(sink=sink, frames=window), []
    for chunk in range(12):
        frames = policy.keep(frames + list(range(chunk * CHUNK, (chunk + 1) * CHUNK)))
        written = (chunk + 1) * CHUNK
        expected = sorted(set(range(min(sink, written))) | set(range(max(0, written - window), written)))
        assert frames == expected
        assert len(frames) <= policy.max_frames


def test_full_keeps_everything_up_to_its_cap_then_refuses():
    policy = FullConfig(cap_frames=6)
    assert policy.keep(list(range(6))) == list(range(6))
    with pytest.raises(ValueError, match=r"full: the stream reached 7 cached frames, over cap_frames=6.*window"):
        policy.keep(list(range(7)))


# -- refusals -----------------------------------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda: WindowConfig(frames=0), r"window: frames=0 must be >= 1"),
    (lambda: SinkWindowConfig(sink=0), r"sink-window: sink=0 must be >= 1: sink=0 is the window policy"),
    (lambda: SinkWindowConfig(frames=-2), r"sink-window: frames=-2 must be >= 1"),
    (lambda: FullConfig(cap_frames=0), r"full: cap_frames=0 must be >= 1"),
    (lambda: KVFormatConfig(format="int2"), r"kv-format: format='int2'; valid: native, bf16, int8, fp8, int4, int4-g64"),
])
def test_bad_configs_are_refused_naming_the_value_and_the_valid_ones(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_window_shorter_than_a_chunk_is_refused():
    with pytest.raises(ValueError, match=r"frames=2 is shorter than one chunk \(frames_per_chunk=3\).*frames >= 3"):
        WindowConfig(frames=2).check_chunk(3)
    with pytest.raises(ValueError, match=r"sink-window: frames=2 is shorter than one chunk"):
        SinkWindowConfig(sink=3, frames=2).check_chunk(3)


def test_a_second_policy_or_format_on_one_model_is_refused_and_leaves_the_first():
    model = tiny_wan()
    policy = apply_policy(model, WindowConfig(frames=3))
    with pytest.raises(ValueError, match=r"already has the policy kv-window\(frames=3\)"):
        apply_policy(model, FullConfig())
    kv_format = apply_format(model, KVFormatConfig(format="int8"))
    with pytest.raises(ValueError, match=r"already stored as kv-format\(format='int8'\)"):
        apply_format(model, KVFormatConfig(format="fp8"))
    assert getattr(model, KV_CACHE).users == 2
    kv_format.remove()
    policy.remove()
    assert not hasattr(model, KV_CACHE)


# -- number formats -------------------------------------------------------------------------

def _rows(seed: int) -> torch.Tensor:
    # (B, H, frames, tokens, dim) with row magnitudes spread over 6 decades and one zero row
    x = seeded_randn(2, 3, 4, 5, 64, seed=seed) * torch.logspace(-3, 3, 5).view(1, 1, 1, 5, 1)
    x[0, 0, 0, 0] = 0
    return x


@pytest.mark.parametrize("seed", range(4))
def test_int8_round_trip_is_within_half_a_step_of_each_rows_scale(seed):
    x = _rows(seed)
    stored = FORMATS["int8"](x)
    assert stored.data.dtype == torch.int8 and stored.scale.shape == (*x.shape[:-1], 1)
    error = (load(stored, torch.float32) - x).abs()
    step = x.abs().amax(-1, keepdim=True) / 127
    assert (error <= step / 2 * (1 + 1e-5) + 1e-30).all()
    assert error[0, 0, 0, 0].max() == 0  # a zero row stays zero


@pytest.mark.parametrize("seed", range(4))
def test_fp8_round_trip_is_within_half_an_e4m3_ulp(seed):
    x = _rows(seed)
    stored = FORMATS["fp8"](x)
    assert stored.data.dtype == torch.float8_e4m3fn
    scale = x.abs().amax(-1, keepdim=True) / 448
    error = (load(stored, torch.float32) - x).abs()
    bound = torch.maximum(x.abs() * 2**-4, scale * 2**-10)
    assert (error <= bound * (1 + 1e-5) + 1e-30).all()


def test_bf16_round_trip_is_bfloat16_rounding():
    x = _rows(0)
    error = (load(FORMATS["bf16"](x), torch.float32) - x).abs()
    assert (error <= x.abs() * 2**-8).all()


# -- the cache on a model -----------------------------------------------------------------

def _video(seed: int, frames: int = CHUNK) -> torch.Tensor:
    return seeded_randn(1, 3, frames, SIDE, SIDE, seed=seed)  # (B, C, F, H, W)


def _forward(model, x, t) -> torch.Tensor:
    timestep = torch.full((1,), float(t)) if not torch.is_tensor(t) else t
    with torch.no_grad():
        return model(hidden_states=x, timestep=timestep, encoder_hidden_states=text(), return_dict=False)[0]


def _write(model, chunk):
    cache = getattr(model, KV_CACHE)
    cache.set_mode("write")
    _forward(model, chunk, 0)
    return cache.commit()


class _BlockCausal(TorchFunctionMode):
    """The reference: the unmodified model over several chunks in one call, each self-attention
    call given ``mask`` (query tokens x key tokens, True = attend)."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            query, key = kwargs.get("query", args[0] if args else None), kwargs.get("key", args[1] if args else None)
            if query.shape[-2] == key.shape[-2] == self.mask.shape[0]:
                kwargs["attn_mask"] = self.mask
        return func(*args, **kwargs)


def _reference(model, chunks, sees, t_last) -> torch.Tensor:
    """Output on the last chunk of one bidirectional call over ``chunks``, chunk i attending the
    chunks in ``sees[i]``; every chunk at timestep 0 but the last, at ``t_last``."""
    per_chunk = CHUNK * (SIDE // 2) ** 2
    blocks = torch.zeros(len(chunks), len(chunks), dtype=torch.bool)
    for i, seen in enumerate(sees):
        blocks[i, list(seen)] = True
    mask = blocks.repeat_interleave(per_chunk, 0).repeat_interleave(per_chunk, 1)
    timestep = torch.zeros(1, len(chunks) * per_chunk)
    timestep[:, -per_chunk:] = t_last
    with _BlockCausal(mask):
        out = _forward(model, torch.cat(chunks, dim=2), timestep)
    return out[:, :, -CHUNK:]


def test_a_chunk_attends_its_cache_as_a_block_causal_model_would():
    model = tiny_wan()
    chunks = [_video(seed) for seed in range(2)]
    reference = _reference(model, chunks, [(0,), (0, 1)], 700.0)
    handle = apply_policy(model, FullConfig())
    _write(model, chunks[0])
    streamed = _forward(model, chunks[1], 700.0)
    handle.remove()
    torch.testing.assert_close(streamed, reference, rtol=1e-4, atol=1e-5)


def test_evicted_frames_are_reindexed_so_relative_positions_are_kept():
    # window(3) drops chunk 0 before chunk 2: chunk 1's keys move from positions 3..5 to 0..2 and
    # chunk 2 takes 3..5, the same distances as 3..5 -> 6..8 in one call over all three chunks.
    model = tiny_wan()
    chunks = [_video(seed) for seed in range(3)]
    reference = _reference(model, chunks, [(0,), (0, 1), (1, 2)], 400.0)
    handle = apply_policy(model, WindowConfig(frames=3))
    assert _write(model, chunks[0]) == [0, 1, 2]
    assert _write(model, chunks[1]) == [3, 4, 5]
    streamed = _forward(model, chunks[2], 400.0)
    handle.remove()
    torch.testing.assert_close(streamed, reference, rtol=1e-4, atol=1e-5)


def test_bytes_are_what_the_kept_frames_take_and_flat_once_the_window_is_full():
    model = tiny_wan()  # 3 layers, 2 heads of 12
    handle = apply_policy(model, WindowConfig(frames=6))
    cache = getattr(model, KV_CACHE)
    assert cache.bytes() == 0
    sizes = []
    for seed in range(6):
        _write(model, _video(seed))
        sizes.append(cache.bytes())
    per_frame = 3 * 2 * (2 * 16 * 12) * 4  # layers x (K, V) x heads * tokens * dim x 4 bytes of float32 (native)
    assert sizes == [3 * per_frame] + [6 * per_frame] * 5
    handle.remove()


@pytest.mark.parametrize("kv_format, ratio", [("int8", (1 + 4 / 12) / 2), ("fp8", (1 + 4 / 12) / 2)])
def test_eight_bit_formats_store_a_byte_a_number_plus_a_scale_a_row(kv_format, ratio):
    sizes = {}
    for name in ("bf16", kv_format):
        model = tiny_wan()
        handles = [apply_policy(model, WindowConfig(frames=3)), apply_format(model, KVFormatConfig(format=name))]
        _write(model, _video(0))
        sizes[name] = getattr(model, KV_CACHE).bytes()
        for handle in reversed(handles):
            handle.remove()
    assert sizes[kv_format] == pytest.approx(sizes["bf16"] * ratio)


def test_an_empty_cache_is_the_model_bit_for_bit_and_remove_restores_it():
    model = tiny_wan()
    x = _video(5, frames=4)
    before = _forward(model, x, 500.0)
    processors = [block.attn1.processor for block in model.blocks]
    hooks = dict(model._forward_pre_hooks)
    handles = [apply_policy(model, SinkWindowConfig(sink=1, frames=3)), apply_format(model, KVFormatConfig("int8"))]
    assert torch.equal(_forward(model, x, 500.0), before)
    _write(model, _video(1))  # fill the cache, then take everything off
    assert not torch.equal(_forward(model, x, 500.0), before)
    for handle in handles:
        handle.remove()
    assert [block.attn1.processor for block in model.blocks] == processors
    assert dict(model._forward_pre_hooks) == hooks and not hasattr(model, KV_CACHE)
    assert torch.equal(_forward(model, x, 500.0), before)


def test_models_it_cannot_stream_are_refused():
    with pytest.raises(ValueError, match=r"streams Wan transformers \(WanTransformer3DModel\); got FluxTransformer2D"):
        apply_policy(tiny_flux(), FullConfig())
    model = tiny_wan()
    sparse = apply_sparse_window(model, SparseWindowConfig(density=0.5, dense_fraction=0))
    with pytest.raises(ValueError, match=r"processor is RoutedWanAttnProcessor, not diffusers. own: it already has a"):
        apply_policy(model, FullConfig())
    sparse.remove()
    assert not hasattr(model, KV_CACHE)
