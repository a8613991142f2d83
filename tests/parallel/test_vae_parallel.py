"""Patch-parallel VAE decode on two gloo processes on the CPU: with a halo that covers the
decoder's reach it decodes as one process does; a smaller halo errs only near the seam, by
a bounded amount; remove() gives back the VAE's own decode; bad configurations are refused
with the valid ones named."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from parallel.vae_scenarios import EXACT_HALO_TINY, LATENT, run_both, tiny_vae

from cadence.parallel import ParallelConfig
from cadence.parallel import vae as vae_bands

# Bit for bit, measured: on the CPU a convolution gives the same floats on a band as on the
# whole frame, and the attention runs on the gathered whole frame. A tolerance would hide a
# row put in the wrong place.
EXACT_TOLERANCE = 0.0
# The seam error with too small a halo, PSNR over the decoder's [-1, 1] range (peak 2).
# Measured 33.1 dB at halo 1 and 54.7 dB at halo 4 (latent 16 x 3 x 32 x 4); the bounds are
# about 8 dB below.
MIN_PSNR = {1: 25.0, 4: 45.0}
# Halos that cover conv_in and the first mid residual block (3 rows) feed the whole-frame
# attention exact inputs, so their error stays within the decoder's reach of the seam;
# a smaller one errs before the attention, which carries the error to every row.
LOCAL_FROM_HALO = 3
# Far from the seam a band's rows differ from one process's by float rounding only (a
# convolution over fewer rows may sum in another order): at most 4e-6 measured at halo 4,
# where the seam error reaches 0.12
ROUNDING = 1e-4


def psnr(got: torch.Tensor, expected: torch.Tensor) -> float:
    mse = (got - expected).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(2.0**2 / mse)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)  # the two ranks and this process share the machine's cores
    ranks, single = run_both(str(tmp_path_factory.mktemp("vae")))
    assert "error" not in ranks[0] and "error" not in ranks[1], ranks[0].get("error") or ranks[1].get("error")
    return ranks, single


def test_exact_halo_decodes_as_one_process_on_every_rank(runs):
    ranks, single = runs
    for rank in ranks:
        difference = (rank["parallelize"] - single).abs().max().item()
        assert difference <= EXACT_TOLERANCE, f"halo={EXACT_HALO_TINY}: max |bands - one process| = {difference}"


def test_small_halo_errs_near_the_seam_only(runs):
    ranks, single = runs
    seam = LATENT[2] // 2 * 8  # pixel row where rank 1's band starts
    for halo, bound in MIN_PSNR.items():
        got = ranks[0][f"halo={halo}"]
        assert torch.equal(got, ranks[1][f"halo={halo}"]), "the ranks gathered different videos"
        assert psnr(got, single) >= bound, f"halo={halo}: PSNR {psnr(got, single):.1f} dB"
        assert not torch.equal(got, single), f"halo={halo} exact: the test would not see a missing halo"
        if halo < LOCAL_FROM_HALO:
            continue
        wrong_rows = ((got - single).abs().amax(dim=(0, 1, 2, 4)) > ROUNDING).nonzero().flatten()
        # a band's zero padding sits `halo` rows past the seam, and its error walks at most the
        # decoder's reach back: it stays within (reach - halo) latent rows of the seam
        reach = (EXACT_HALO_TINY - halo) * 8
        assert wrong_rows.min() >= seam - reach and wrong_rows.max() < seam + reach, wrong_rows


def test_remove_gives_back_the_one_process_decode(runs):
    ranks, single = runs
    for rank in ranks:
        assert torch.equal(rank["removed"], single)
        assert rank["removed-attributes"] == []  # no _decode left on the instance


def test_one_rank_is_a_no_op(runs):
    ranks, _ = runs
    assert ranks[0]["world-1"] is None and ranks[1]["world-1"] is None


def test_latent_shorter_than_the_ranks_is_refused(runs):
    ranks, _ = runs
    assert "cannot be split into 2 bands" in ranks[0]["one-row"] and "at most 1" in ranks[0]["one-row"]


def test_exact_halo_counts_the_decoders_reach():
    from diffusers import AutoencoderKLWan

    assert vae_bands.exact_halo(tiny_vae()) == EXACT_HALO_TINY  # measured exact above
    assert vae_bands.exact_halo(AutoencoderKLWan(base_dim=8)) == 15  # Wan 2.1 architecture: 114 pixel rows
    wan22 = AutoencoderKLWan(base_dim=8, is_residual=True, patch_size=2)
    assert vae_bands.exact_halo(wan22) is None  # Wan 2.2's residual decoder: not counted


def test_band_bounds_cover_the_height_once():
    for height, world in ((32, 2), (60, 8), (7, 3)):
        bounds = vae_bands.band_bounds(height, world)
        assert bounds[0][0] == 0 and bounds[-1][1] == height
        assert all(end == start for (_, end), (start, _) in pairwise(bounds))
        assert max(e - s for s, e in bounds) - min(e - s for s, e in bounds) <= 1


def test_unsupported_vae_and_bad_options_are_refused():
    from diffusers import AutoencoderKL

    with pytest.raises(ValueError, match="AutoencoderKL is not supported; supported VAE classes: AutoencoderKLWan"):
        vae_bands.check(AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4), 2)
    with pytest.raises(ValueError, match="the pipeline has no vae; supported VAE classes: AutoencoderKLWan"):
        vae_bands.check(None, 2)
    vae = tiny_vae()
    with pytest.raises(ValueError, match=r"vae_halo=-1 must be an integer >= 0"):
        vae_bands.check(vae, -1)
    vae.enable_tiling()
    with pytest.raises(ValueError, match=r"tiling on .* vae.disable_tiling\(\)"):
        vae_bands.check(vae, 2)


def test_parallel_config_vae_option_parses_validates_and_prints():
    assert ParallelConfig.parse("ulysses=2, cfg=2, vae=1") == ParallelConfig(ulysses=2, cfg=2, vae=True)
    assert ParallelConfig.parse("cfg=2, vae=1, vae_halo=14").vae_halo == 14
    assert str(ParallelConfig(cfg=2)) == "ulysses=1, ring=1, cfg=2"  # off: printed as before
    assert str(ParallelConfig(cfg=2, vae=True)) == "ulysses=1, ring=1, cfg=2, vae=1, vae_halo=8"
    assert ParallelConfig(cfg=2, vae=True).world == 2  # the VAE adds no degree
    with pytest.raises(ValueError, match="vae='yes' must be one of 1, true, on, 0, false, off"):
        ParallelConfig.parse("cfg=2, vae=yes")
    with pytest.raises(ValueError, match="vae_halo=4 is set but vae is off"):
        ParallelConfig.parse("cfg=2, vae_halo=4")
    with pytest.raises(ValueError, match="vae_halo=3 is set but vae is off"):
        ParallelConfig(cfg=2, vae_halo=3)  # as the parser refuses it: printed without vae, the halo would be lost
    with pytest.raises(ValueError, match="vae=2 must be True or False"):
        ParallelConfig(vae=2)
    with pytest.raises(ValueError, match="vae_halo=-3 must be an integer >= 0"):
        ParallelConfig(vae=True, vae_halo=-3)


def test_parallelize_refuses_vae_without_a_supported_vae_before_any_collective():
    from conftest import tiny_wan

    from cadence.parallel import parallelize

    with pytest.raises(ValueError, match="the pipeline has no vae"):
        parallelize(tiny_wan(), ParallelConfig(cfg=2, vae=True))  # torch.distributed is not even initialised


def test_accelerate_refuses_vae_on_a_pipeline_without_one_and_leaves_it_unchanged():
    """cadence.accelerate hands the pipeline's VAE to the split; ref-video works in pixel space
    (no VAE): refused before any collective, with the recipe's own hooks taken off again."""
    import cadence
    from cadence.loading import load_reference

    pipe = load_reference("ref-video", text_encoder=False)
    before = {name: tensor.clone() for name, tensor in pipe.transformer.state_dict().items()}
    with pytest.raises(ValueError, match="the pipeline has no vae; supported VAE classes: AutoencoderKLWan"):
        cadence.accelerate(pipe, "fp8", parallel=ParallelConfig(cfg=2, vae=True))
    after = pipe.transformer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert type(pipe.transformer.blocks[0].attn1.to_q) is torch.nn.Linear  # fp8 taken off again
