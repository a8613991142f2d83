"""kv-pack: the sink and the recent window whole, the frames evicted in between pooled ratio x
ratio and bounded to ``mid``. With ratio 1 it is kv-sink-window(sink, frames + mid) bit for bit; its bytes are flat once full; pooled tokens are rotated at their patches' centres;
it refuses bad knobs; taking it off gives the model back exactly."""

import pytest
import torch
from conftest import seeded_randn, text, tiny_wan
from diffusers.models.embeddings import get_1d_rotary_pos_embed

from cadence.accel.sequence import KVFormatConfig, PackConfig, SinkWindowConfig, WindowConfig
from cadence.accel.sequence._base import KV_CACHE, apply_policy
from cadence.accel.sequence.pack import pool_frames, pooled_grid
from cadence.accel.sequence.rope import rotary_tables, rotary_tables_at
from cadence.stream import stream

SIZE = {"height": 8, "width": 8}  # 4 x 4 patches of 2 x 2: 16 tokens a frame
CALL = {"steps_per_chunk": 1, **SIZE}
ROW = 3 * 2 * 2 * 12  # numbers a token takes: layers x (K, V) x heads x head dim


def _streamed(model, policy, chunks, **kwargs):
    """Each chunk of an unbounded stream (every chunk written) with the cache's pooled frames after it."""
    generator = stream(model, text(), policy=policy, **CALL, **kwargs)
    out = []
    for _ in range(chunks):
        chunk = next(generator)
        out.append((chunk, list(getattr(model, KV_CACHE).pooled)))
    generator.close()
    return out


# -- what it keeps ---------------------------------------------------------------------------

def test_it_keeps_the_sink_and_window_whole_and_the_last_evicted_frames_pooled():
    steps = _streamed(tiny_wan(), PackConfig(sink=3, frames=3, mid=4, ratio=2), 6)
    assert [chunk.kept_frames for chunk, _ in steps] == [
        [0, 1, 2], [0, 1, 2, 3, 4, 5], [0, 1, 2, 6, 7, 8], [0, 1, 2, 9, 10, 11], [0, 1, 2, 12, 13, 14],
        [0, 1, 2, 15, 16, 17]]
    assert [pooled for _, pooled in steps] == [[], [], [3, 4, 5], [5, 6, 7, 8], [8, 9, 10, 11], [11, 12, 13, 14]]


@pytest.mark.parametrize("pack, same", [
    (PackConfig(sink=3, frames=3, mid=6, ratio=1), SinkWindowConfig(sink=3, frames=9)),
    (PackConfig(sink=0, frames=3, mid=3, ratio=1), WindowConfig(frames=6)),
])
def test_ratio_one_is_the_sink_window_of_frames_plus_mid_bit_for_bit(pack, same):
    # sink + the last `mid` evicted + the last `frames` = sink + the last `frames + mid`, each at the same
    # position and read in the same order, so every chunk is the same bit for bit (6 chunks: both drop frames)
    model = tiny_wan()
    packed = list(stream(model, text(), chunks=6, policy=pack, **CALL))
    reference = list(stream(model, text(), chunks=6, policy=same, **CALL))
    for a, b in zip(packed, reference):
        assert torch.equal(a.latents, b.latents) and a.kv_bytes == b.kv_bytes
    # and pooling is not (the comparison can fail): equal until the first chunk that reads a pooled frame,
    # the one after the cache first held more than sink + frames frames
    first = (pack.sink + pack.frames) // 3 + 1
    pooled = list(stream(model, text(), chunks=6, policy=PackConfig(sink=pack.sink, frames=3, mid=pack.mid, ratio=2),
                         **CALL))
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(pooled[:first], packed[:first]))
    assert not torch.equal(pooled[first].latents, packed[first].latents)


@pytest.mark.parametrize("kv_format, token_bytes", [("native", ROW * 4), ("int4", 3 * 2 * 2 * (6 + 8))])  # int4: 168
def test_kv_bytes_are_flat_once_full_and_follow_the_three_parts(kv_format, token_bytes):
    steps = _streamed(tiny_wan(), PackConfig(sink=3, frames=3, mid=3, ratio=2), 14,
                      kv_format=KVFormatConfig(format=kv_format))
    sizes = [chunk.kv_bytes for chunk, _ in steps]
    assert sizes[3] == sizes[13]  # after N chunks as after N + 10
    assert len(set(sizes[2:])) == 1
    # (sink + frames) frames of 16 tokens and mid frames of 2 x 2 pooled tokens
    assert sizes[:3] == [3 * 16 * token_bytes, 6 * 16 * token_bytes, (6 * 16 + 3 * 4) * token_bytes]


def test_a_recipe_of_pack_and_int4_streams_with_flat_bytes_and_leaves_the_model_as_it_was():
    import cadence

    model = tiny_wan()
    x = seeded_randn(1, 3, 4, 8, 8, seed=6)
    before = _forward(model, x)
    acceleration = cadence.accelerate(model, "kv-pack(sink=3, frames=3, mid=3, ratio=2) + kv-format(format=int4)")
    steps = _streamed(model, None, 5)  # the stream takes the terms the model carries
    assert [chunk.kv_bytes for chunk, _ in steps] == [3 * 16 * 168, 6 * 16 * 168] + [(6 * 16 + 3 * 4) * 168] * 3
    acceleration.remove()
    assert torch.equal(_forward(model, x), before) and not hasattr(model, KV_CACHE)


def test_a_prompt_switch_recaches_the_whole_frames_and_drops_the_pooled_ones():
    steps = _streamed(tiny_wan(), PackConfig(sink=3, frames=3, mid=3, ratio=2), 6, prompts={4: text(seed=3)})
    assert [chunk.recached_frames for chunk, _ in steps][4] == [0, 1, 2, 9, 10, 11]  # whole frames only
    # 6, 7, 8 were pooled under the old prompt and go; 9, 10, 11, re-encoded, are pooled when chunk 4 evicts them
    assert [pooled for _, pooled in steps][3:] == [[6, 7, 8], [9, 10, 11], [12, 13, 14]]


# -- pooling and its positions -----------------------------------------------------------------

def test_pooling_averages_each_patch_of_the_tokens_it_has_at_the_edge():
    height, width = 5, 3
    x = seeded_randn(2, 2, 3, height * width, 6)  # (B, H, frames, tokens, dim)
    pooled = pool_frames(x, height, width, 2)
    grid = x.unflatten(3, (height, width))
    assert pooled.shape == (2, 2, 3, 3 * 2, 6)
    for row in range(3):
        for column in range(2):
            patch = grid[:, :, :, 2 * row:2 * row + 2, 2 * column:2 * column + 2]  # 2 x 2, 2 x 1, 1 x 2 or 1 x 1
            torch.testing.assert_close(pooled[:, :, :, row * 2 + column], patch.mean(dim=(3, 4)))
    assert torch.equal(pool_frames(x, height, width, 1), x)
    rows, columns = pooled_grid(height, width, 2)
    assert rows.tolist() == [0.5, 0.5, 2.5, 2.5, 4.0, 4.0] and columns.tolist() == [0.5, 2.0] * 3


def test_pooled_tokens_are_rotated_at_their_centres_and_whole_ones_as_the_model_rotates():
    rope = tiny_wan(attention_head_dim=24).rope  # frame, row, column parts of 8 numbers
    positions = torch.tensor([2, 5])
    rows, columns = torch.arange(4.0).repeat_interleave(3), torch.arange(3.0).repeat(4)  # the whole 4 x 3 grid
    for made, reference in zip(rotary_tables_at(rope, positions, rows, columns), rotary_tables(rope, positions, 4, 3)):
        assert torch.equal(made, reference)
    rows, columns = torch.tensor([0.5, 2.5, 4.0]), torch.tensor([1.5, 0.0, 3.5])
    cos, sin = rotary_tables_at(rope, positions, rows, columns)  # (1, 1, frames * tokens, dim)
    for part, coordinates, start in ((rope.h_dim, rows, rope.t_dim), (rope.w_dim, columns, rope.t_dim + rope.h_dim)):
        want_cos, want_sin = get_1d_rotary_pos_embed(part, coordinates.double(), use_real=True,
                                                     repeat_interleave_real=True, freqs_dtype=torch.float64)
        for got, want in ((cos, want_cos), (sin, want_sin)):
            for frame in range(2):  # the same spatial tables in both frames
                got_part = got[0, 0, 3 * frame:3 * frame + 3, start:start + part].double()
                torch.testing.assert_close(got_part, want.double(), rtol=0, atol=1e-6)


# -- restoring and refusing --------------------------------------------------------------------

def _forward(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text(),
                     return_dict=False)[0]


def test_remove_restores_the_model_bit_for_bit_after_frames_were_pooled():
    model = tiny_wan()
    x = seeded_randn(1, 3, 4, 8, 8, seed=6)
    before = _forward(model, x)
    processors = [block.attn1.processor for block in model.blocks]
    handle = apply_policy(model, PackConfig(sink=1, frames=3, mid=2, ratio=2))
    cache = getattr(model, KV_CACHE)
    assert torch.equal(_forward(model, x), before)  # an empty cache is the model
    for seed in range(3):
        cache.set_mode("write")
        _forward(model, seeded_randn(1, 3, 3, 8, 8, seed=seed))
        cache.commit()
    assert cache.frames == [0, 6, 7, 8] and cache.pooled == [4, 5]
    assert cache.pooled_keys[0].data.shape == (1, 2, 2, 4, 12)  # 2 frames of 2 x 2 pooled tokens
    assert not torch.equal(_forward(model, x), before)
    handle.remove()
    assert [block.attn1.processor for block in model.blocks] == processors and not hasattr(model, KV_CACHE)
    assert torch.equal(_forward(model, x), before)


@pytest.mark.parametrize("make, message", [
    (lambda: PackConfig(mid=0), r"kv-pack: mid=0 must be >= 1: mid=0 is kv-sink-window"),
    (lambda: PackConfig(ratio=0), r"kv-pack: ratio=0 must be >= 1"),
    (lambda: PackConfig(sink=-1), r"kv-pack: sink=-1 must be >= 0"),
    (lambda: PackConfig(frames=0), r"kv-pack: frames=0 must be >= 1"),
    (lambda: PackConfig(ratio=2.5), r"kv-pack: ratio=2.5; valid: a whole number of patches"),
    (lambda: PackConfig(frames=2).check_chunk(3),
     r"kv-pack: frames=2 is shorter than one chunk \(frames_per_chunk=3\).*valid: frames >= 3"),
])
def test_bad_knobs_are_refused_naming_the_value_and_the_valid_ones(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_pack_whose_positions_pass_the_rotary_table_is_refused_before_the_stream():
    model = tiny_wan()  # rope_max_seq_len=32
    with pytest.raises(ValueError, match=r"kv-pack\(mid=20\) keeps up to 35 frames.*valid: at most 29 cached frames"):
        stream(model, text(), policy=PackConfig(mid=20), **CALL)
    assert not hasattr(model, KV_CACHE)
