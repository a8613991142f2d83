"""Adding a model family is one ``register_family`` call: a toy DiT written here, unknown to
diffusers' model zoo and to cadence, is accelerated at every level it has (step reuse,
sparse attention, compile) once its one :class:`Family` entry is registered, and
``remove()`` gives the exact model back. Nothing in the package names it."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from torch import nn

import cadence
from cadence.cli import main
from cadence.models import (
    Family,
    FamilyRecipe,
    TokenLayout,
    adapter_for,
    default_recipe,
    find_family,
    register_family,
    unregister_family,
)
from cadence.models.family import argument

STEPS = 8
LATENT = (1, 4, 16, 16)  # (B, C, H, W): 8 x 8 = 64 tokens after 2 x 2 patches, 4 blocks of 16


# -- a toy transformer: DiT (Peebles & Xie), adaLN-modulated blocks over image patches -----
class ToyAttnProcessor:
    """As a diffusers attention processor: the module holds the weights, the processor runs them."""

    def __call__(self, attn, hidden_states):
        batch, tokens, dim = hidden_states.shape
        qkv = attn.to_qkv(hidden_states).reshape(batch, tokens, 3, attn.heads, dim // attn.heads)
        query, key, value = qkv.permute(2, 0, 3, 1, 4)  # (B, heads, tokens, head_dim) each
        out = F.scaled_dot_product_attention(query, key, value)
        return attn.to_out(out.transpose(1, 2).reshape(batch, tokens, dim))


class ToyAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.to_out = nn.Linear(dim, dim)
        self.processor = ToyAttnProcessor()

    def forward(self, hidden_states):
        return self.processor(self, hidden_states)


class ToyBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = ToyAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(approximate="tanh"), nn.Linear(2 * dim, dim))
        self.modulation = nn.Linear(dim, 6 * dim)

    def forward(self, hidden_states, temb):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(temb)[:, None].chunk(6, dim=-1)  # (B, 1, dim)
        hidden_states = hidden_states + gate1 * self.attn(self.norm1(hidden_states) * (1 + scale1) + shift1)
        return hidden_states + gate2 * self.mlp(self.norm2(hidden_states) * (1 + scale2) + shift2)


class ToyDiT2DModel(nn.Module):
    def __init__(self, channels=4, patch=2, dim=32, heads=2, layers=3):
        super().__init__()
        self.patch, self.dim = patch, dim
        self.embed = nn.Linear(channels * patch * patch, dim)
        self.time_embed = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(ToyBlock(dim, heads) for _ in range(layers))
        self.proj_out = nn.Linear(dim, channels * patch * patch)

    def forward(self, hidden_states, timestep, return_dict=False):
        batch, channels, height, width = hidden_states.shape
        p, rows, columns = self.patch, height // self.patch, width // self.patch
        patches = hidden_states.reshape(batch, channels, rows, p, columns, p).permute(0, 2, 4, 1, 3, 5)
        tokens = self.embed(patches.reshape(batch, rows * columns, -1))  # (B, tokens, dim), raster order
        half = self.dim // 2
        angles = timestep.float()[:, None] * torch.exp(-math.log(10000) * torch.arange(half) / half)
        temb = self.time_embed(torch.cat([angles.cos(), angles.sin()], dim=-1))  # (B, dim)
        for block in self.blocks:
            tokens = block(tokens, temb)
        out = self.proj_out(tokens).reshape(batch, rows, columns, channels, p, p).permute(0, 3, 1, 4, 2, 5)
        return (out.reshape(batch, channels, height, width),)


# -- its family: the whole of what cadence needs to know about it ---------------------------
def toy_token_layout(model, args, kwargs):
    _, _, height, width = argument(args, kwargs, "hidden_states", 0).shape  # (B, C, H, W)
    return TokenLayout(1, height // model.patch, width // model.patch)


def toy_modulated_input(block, args, kwargs, hidden):
    shift, scale = block.modulation(argument(args, kwargs, "temb", 1))[:, None].chunk(6, dim=-1)[:2]
    return block.norm1(hidden) * (1 + scale) + shift


TOY = Family(
    name="toy-dit",
    classes=("ToyDiT2DModel",),
    blocks=("blocks",),
    token_layout=toy_token_layout,
    attention=("attn",),
    recipe=FamilyRecipe("fixed-interval(interval=2) + sparse-window(density=0.5, block=16, dense_fraction=0) + compile",
                        "a toy: nothing measured", needs="nothing"),
    sparse_pattern="sparse-window(density=0.5, block=16, dense_fraction=0)",
    modulated_input=toy_modulated_input,
    references=("ref-toy",),
)
# The block's output layout, as diffusers' cache hooks read it (a new diffusers model
# registers its blocks there itself). Keyed by this file's class: no other test sees it.
TransformerBlockRegistry.register(ToyBlock, TransformerBlockMetadata(return_hidden_states_index=0))


@pytest.fixture
def toy():
    register_family(TOY)
    torch.manual_seed(0)
    yield ToyDiT2DModel().eval()
    unregister_family(TOY.name)


def denoise(model, steps=STEPS) -> torch.Tensor:
    """Flow-matching Euler from seeded noise; the step is inferred from the timestep."""
    latent = torch.randn(*LATENT, generator=torch.Generator().manual_seed(0))
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    with torch.no_grad():
        for sigma, next_sigma in zip(sigmas[:-1], sigmas[1:]):
            velocity = model(hidden_states=latent, timestep=torch.full((1,), float(sigma) * 1000))[0]
            latent = latent + (next_sigma - sigma) * velocity
    return latent


def test_a_registered_family_answers_to_its_names_and_shows_its_default_recipe(toy):
    for name in ("toy-dit", "ToyDiT2DModel", "ref-toy"):
        assert find_family(name) is TOY
        assert default_recipe(name) is TOY.recipe
    adapter = adapter_for(toy)
    assert adapter.family is TOY and adapter.blocks == list(toy.blocks)
    assert adapter.attention_modules() == [block.attn for block in toy.blocks]
    result = CliRunner().invoke(main, ["recipes", "--model", "toy-dit"])
    assert result.exit_code == 0 and f'--recipe "{TOY.recipe.recipe}"' in result.output, result.output


def test_step_policy_reuses_and_remove_restores_bit_identical_outputs(toy):
    baseline = denoise(toy)
    with cadence.accelerate(toy, "fixed-interval(interval=2)") as acceleration:
        accelerated = denoise(toy)
        stats = acceleration.stats()
    assert stats["forwards"] == STEPS and stats["compute_fraction"] < 1
    assert torch.isfinite(accelerated).all() and not torch.equal(accelerated, baseline)
    assert torch.equal(denoise(toy), baseline)


def test_default_sparse_pattern_runs_sparse_and_remove_restores(toy):
    baseline = denoise(toy, steps=3)
    with cadence.accelerate(toy, TOY.sparse_pattern) as acceleration:
        accelerated = denoise(toy, steps=3)
        stats = acceleration.stats()
    assert stats["sparse_calls"] == 3 * len(toy.blocks) and stats["density"] == 0.5
    assert torch.isfinite(accelerated).all() and not torch.equal(accelerated, baseline)
    assert torch.equal(denoise(toy, steps=3), baseline)


def test_default_recipe_composes_the_levels_and_remove_restores(toy):
    baseline = denoise(toy)
    recipe = default_recipe("ToyDiT2DModel").recipe.replace("compile", "compile(backend='aot_eager')")
    with cadence.accelerate(toy, recipe) as acceleration:
        accelerated = denoise(toy)
        stats = acceleration.stats()
    assert stats["compiled_blocks"] == len(toy.blocks)
    assert stats["compute_fraction"] < 1 and stats["sparse_calls"] > 0
    assert torch.isfinite(accelerated).all()
    assert torch.equal(denoise(toy), baseline)


def test_modulated_input_is_what_the_first_attention_reads(toy):
    adapter, seen = adapter_for(toy), {}
    first = adapter.blocks[0]
    first.register_forward_pre_hook(lambda module, args: seen.setdefault("block", args))
    first.attn.register_forward_pre_hook(lambda module, args: seen.setdefault("attn", args))
    denoise(toy, steps=1)
    args = seen["block"]
    modulated = adapter.modulated_input(first, args, {}, args[0])
    torch.testing.assert_close(modulated, seen["attn"][0])


def test_unregistered_family_is_no_longer_adapted(toy):
    unregister_family(TOY.name)
    try:
        with pytest.raises(ValueError, match="no cadence adapter for ToyDiT2DModel"):
            adapter_for(toy)
        with pytest.raises(ValueError, match="no default recipe for 'toy-dit'"):
            default_recipe("toy-dit")
    finally:
        register_family(TOY)  # for the fixture to unregister


def test_a_name_another_family_answers_to_is_refused():
    with pytest.raises(ValueError, match=r"'WanTransformer3DModel' \(family 'wan'\)"):
        register_family(dataclasses.replace(TOY, classes=("ToyDiT2DModel", "WanTransformer3DModel")))
    with pytest.raises(ValueError, match=r"'ref-video' \(family 'wan'\)"):
        register_family(dataclasses.replace(TOY, references=("ref-video",)))
    assert find_family("toy-dit") is None


@pytest.mark.parametrize("field,value,message", [
    ("classes", "ToyDiT2DModel", "must be a tuple of names"),
    ("blocks", (), "must name at least one"),
    ("tensor_format", "BHWC", "one of BCFHW, BFCHW, BCHW"),
    ("timestep_scale", 0.0, "must be > 0"),
])
def test_a_family_refuses_bad_fields_with_the_valid_range(field, value, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TOY, **{field: value})
