"""Block masks: pure functions of the layout and the pattern's parameters."""

import pytest
import torch

from cadence.accel.attention.patterns import (
    Geometry,
    captured_mass,
    keep_count,
    nearest,
    radial_distance,
    sink_local,
    spatial_distance,
    temporal_distance,
    tile_shape,
    top_blocks,
    window_distance,
)
from cadence.models import TokenLayout

WAN_480P = TokenLayout(21, 30, 52)  # Wan2.1 at 480p x 81 frames: 32,760 tokens


@pytest.mark.parametrize("layout,block,tile", [
    (WAN_480P, 128, (2, 8, 8)),
    (TokenLayout(1, 64, 64), 128, (1, 8, 16)),
    (TokenLayout(4, 8, 8), 16, (1, 4, 4)),
])
def test_tile_holds_one_block(layout, block, tile):
    assert tile_shape(layout, block) == tile


@pytest.mark.parametrize("layout", [WAN_480P, TokenLayout(3, 6, 10, text=7, text_first=True), TokenLayout(2, 4, 4, text=5)])
def test_order_is_a_permutation_with_text_last(layout):
    geometry = Geometry(layout, 16)
    order = geometry.order
    assert sorted(order.tolist()) == list(range(layout.tokens))
    text = set(range(layout.text)) if layout.text_first else set(range(layout.video, layout.tokens))
    assert set(order[layout.video:].tolist()) == text
    assert torch.equal(order[geometry.inverse], torch.arange(layout.tokens))


def test_blocks_are_compact_bricks():
    """A 128-token block of Wan at 480p spans 2 frames and a few rows (in raster order it
    would be 3 whole rows of 52 in one frame); where 2-frame tiles meet, a block straddles
    the two (30 x 52 is not a multiple of 128) and spans up to 4 frames."""
    geometry = Geometry(WAN_480P, 128)
    frame = geometry.order // (30 * 52)
    row = geometry.order // 52 % 30
    blocks = frame[: 128 * 240].view(240, 128), row[: 128 * 240].view(240, 128)
    spans = [(x.amax(-1) - x.amin(-1)) for x in blocks]
    assert spans[0].max() <= 3 and spans[0].float().mean() < 1.1 and spans[1].float().mean() < 12


def test_text_blocks_are_dense():
    geometry = Geometry(TokenLayout(2, 4, 4, text=5), 16)  # 32 video + 5 text: 3 blocks, 2 pattern blocks
    assert (geometry.num_blocks, geometry.pattern_blocks) == (3, 2)
    full = geometry.full_mask(torch.eye(2, dtype=torch.bool))
    assert full[2].all() and full[:, 2].all() and not full[0, 1]


@pytest.mark.parametrize("distance", [window_distance, radial_distance, spatial_distance, temporal_distance])
@pytest.mark.parametrize("density", [0.05, 0.1, 0.25, 0.5, 1.0])
def test_static_patterns_keep_the_density_and_the_diagonal(distance, density):
    centers = Geometry(TokenLayout(8, 16, 16), 16).centers
    mask = nearest(distance(centers), density)
    blocks = len(centers)
    assert (mask.sum(-1) == keep_count(density, blocks)).all()
    assert mask.diagonal().all()


def test_window_keeps_the_nearest_blocks():
    centers = Geometry(TokenLayout(8, 16, 16), 16).centers
    distance = window_distance(centers)
    mask = nearest(distance, 0.25)
    farthest_kept = distance.masked_fill(~mask, -1).amax(-1)
    nearest_dropped = distance.masked_fill(mask, float("inf")).amin(-1)
    assert (farthest_kept <= nearest_dropped).all()


def test_spatial_and_temporal_heads_look_along_different_axes():
    geometry = Geometry(TokenLayout(8, 8, 8), 16)  # tiles of 1 x 4 x 4: 4 blocks per frame
    centers = geometry.centers
    spatial = nearest(spatial_distance(centers), 4 / 32)[0]  # block 0: its own frame
    temporal = nearest(temporal_distance(centers), 8 / 32)[0]  # block 0: its place in every frame
    assert set(centers[spatial, 0].tolist()) == {0.0}
    assert len(set(centers[temporal, 0].tolist())) == 8 and len({tuple(c) for c in centers[temporal, 1:].tolist()}) == 1


def test_radial_window_shrinks_with_frame_distance():
    geometry = Geometry(TokenLayout(8, 16, 16), 16)
    centers = geometry.centers
    mask = nearest(radial_distance(centers), 0.2)[0]
    kept_per_frame = torch.bincount(centers[mask, 0].long(), minlength=8)
    assert kept_per_frame[0] >= kept_per_frame[1] >= kept_per_frame[3] >= kept_per_frame[7]


def test_sink_local():
    mask = sink_local(16, 0.25, sink=2)
    assert mask[:, :2].all() and mask.diagonal().all() and (mask.sum(-1) == 4).all()
    causal = sink_local(16, 0.25, sink=1, causal=True)
    assert not causal.triu(1).any() and causal[:, 0].all() and causal.diagonal().all()


def test_top_blocks_find_the_heavy_blocks():
    """Keys copied from one query block score highest for it."""
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 2, 64, 8, generator=generator)
    key = torch.randn(1, 2, 64, 8, generator=generator) * 0.1
    key[..., 48:64, :] = query[..., 0:16, :].mean(-2, keepdim=True) * 4  # block 3 matches query block 0
    mask = top_blocks(query, key, 16, density=0.5)
    assert mask.shape == (1, 2, 4, 4)
    assert mask[..., 0, 3].all() and mask.diagonal(dim1=-2, dim2=-1).all()
    assert (mask.sum(-1) == 2).all()
    # A mass target stops early: with all the mass on block 3 and the diagonal, 2 blocks.
    assert (top_blocks(query, key, 16, density=1.0, mass=0.5)[..., 0, :].sum(-1) <= 2).all()


def test_captured_mass_of_the_full_mask_is_one():
    generator = torch.Generator().manual_seed(1)
    query, key = torch.randn(2, 3, 48, 8, generator=generator), torch.randn(2, 3, 48, 8, generator=generator)
    candidates = torch.stack([torch.ones(3, 3, dtype=torch.bool), torch.eye(3, dtype=torch.bool)])[:, None, None]
    mass = captured_mass(query, key, candidates, 16, samples=12)
    assert mass.shape == (2, 2, 3)
    torch.testing.assert_close(mass[0], torch.ones(2, 3))
    assert (mass[1] < 1).all() and (mass[1] > 0).all()
