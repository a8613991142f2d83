"""The CLI on a user's own checkpoint: ``cadence generate``, ``calibrate`` and ``bench`` on a
WanPipeline and a FluxPipeline directory written by ``save_pretrained``, each pipeline driven
in its own argument names at the size named (or refused, in one line, before any generation,
leaving nothing written)."""

import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from tiny_checkpoints import SIZES, size_options

import cadence
from cadence.accel import calibration
from cadence.cli import main


def invoke(*args: str):
    return CliRunner().invoke(main, [*args, "--device", "cpu"])


def _succeeded(result) -> None:
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output


def _refused(result, *fragments: str) -> str:
    assert isinstance(result.exception, SystemExit), f"crashed with {result.exception!r}:\n{result.output}"
    assert result.exit_code != 0 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} missing from {errors[0]!r}"
    return errors[0]


def _files(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


@pytest.mark.parametrize("name", ["wan", "flux"])
def test_generate_drives_the_checkpoints_own_pipeline_at_the_size_named(name, checkpoint_dirs, tmp_path):
    size = SIZES[name]
    before = _files(checkpoint_dirs(name))
    out = tmp_path / "clip.gif"
    result = invoke("generate", "--model", str(checkpoint_dirs(name)), "--prompt", "a red cube", "--steps", "3",
                    "--recipe", "fixed-interval(interval=2)", *size_options(size), "--out", str(out))
    _succeeded(result)
    assert f"wrote {out}" in result.output and "'compute_fraction'" in result.output
    with Image.open(out) as clip:
        assert clip.size == (size["width"] * 4, size["height"] * 4)  # write_video upscales 4x
        frames = getattr(clip, "n_frames", 1)
        assert 1 <= frames <= size.get("frames", 1)  # a GIF merges equal consecutive frames into one
    assert _files(tmp_path) == ["clip.gif"]  # no partial file beside it
    assert _files(checkpoint_dirs(name)) == before


def test_generate_at_the_checkpoints_default_size_when_none_is_named(checkpoint_dirs, tmp_path):
    """FluxPipeline's default is the transformer's sample size times the VAE's scale (here
    128 x 1): made when no size is named."""
    out = tmp_path / "image.png"
    result = invoke("generate", "--model", str(checkpoint_dirs("flux")), "--prompt", "a red cube", "--steps", "1",
                    "--out", str(out))
    _succeeded(result)
    assert "128 x 128" in result.output
    with Image.open(out) as image:
        assert image.size == (512, 512)


SIZE_REFUSALS = {
    "wan default beyond its rotary embedding": (
        "wan", [], ["81 frames x 480 x 832 (the checkpoint's default size)", "rope_max_seq_len=32",
                    "height and width at most 512"]),
    "wan height off the multiple": ("wan", ["--height", "20", "--width", "16", "--frames", "5"],
                                    ["height=20 must be a multiple of 16", "scale factor 8", "patch size 2", "16, 32"]),
    "wan frames off the VAE's temporal step": ("wan", ["--height", "16", "--width", "16", "--frames", "6"],
                                               ["frames=6 must be 1 + a multiple of 4", "5 or 9"]),
    "flux frames": ("flux", ["--frames", "5"], ["frames=5", "FluxPipeline makes images"]),
    "flux odd width": ("flux", ["--height", "16", "--width", "15"], ["width=15 must be a multiple of 2", "packing"]),
}


@pytest.mark.parametrize("command", ["generate", "calibrate", "bench"])
@pytest.mark.parametrize("name, size, fragments", SIZE_REFUSALS.values(), ids=SIZE_REFUSALS.keys())
def test_a_size_the_checkpoint_cannot_make_is_refused_before_generating(command, name, size, fragments,
                                                                        checkpoint_dirs, tmp_path, monkeypatch):
    from cadence import generation

    monkeypatch.setattr(generation, "generate", lambda *a, **k: pytest.fail("generated at a refused size"))
    monkeypatch.setenv("CADENCE_CACHE", str(tmp_path / "cache"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n")
    model = ["--model", str(checkpoint_dirs(name))]
    out = tmp_path / "out"
    args = {
        "generate": ["generate", *model, "--prompt", "a red cube", "--out", str(out / "clip.gif")],
        "calibrate": ["calibrate", *model, "--technique", "magcache", "--out", str(out / "magcache.json")],
        "bench": ["bench", *model, "--recipe", "fixed-interval", "--prompts", str(prompts), "--out", str(out)],
    }[command]
    _refused(invoke(*args, *size), *fragments)
    assert _files(out) == [] if out.exists() else True
    assert not (tmp_path / "cache").exists() or _files(tmp_path / "cache") == []


@pytest.mark.parametrize("name, technique", [("wan", "magcache"), ("flux", "int8")])
def test_calibrate_fits_a_checkpoint_at_the_size_named(name, technique, checkpoint_dirs, tmp_path):
    directory, size = checkpoint_dirs(name), SIZES[name]
    out = tmp_path / f"{technique}.json"
    result = invoke("calibrate", "--model", str(directory), "--technique", technique, "--prompts", "1",
                    "--steps", "3", *size_options(size), "--out", str(out))
    _succeeded(result)
    assert f"wrote {out}" in result.output and f"{size['height']} x {size['width']}" in result.output
    pipe = cadence.load(str(directory))
    pipe.set_progress_bar_config(disable=True)
    store = {"magcache": "magcache", "int8": "activations"}[technique]
    assert calibration.load(pipe.transformer, store, str(out))  # made for this model
    term = f"magcache(calibration='{out}')" if technique == "magcache" else f"int8(calibration='{out}')"
    with cadence.accelerate(pipe, term):
        from cadence import generation

        output = generation.generate(pipe, "a red cube", steps=3, seed=0, guidance_scale=4.0,
                                     size=generation.resolve_size(pipe, **size))
    assert torch.isfinite(output).all()


@pytest.mark.parametrize("name", ["wan", "flux"])
def test_bench_measures_a_checkpoint_directory_on_prompts_from_a_file(name, checkpoint_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("CADENCE_CACHE", str(tmp_path / "cache"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n\na blue sphere\n")
    out = tmp_path / "bench"
    result = invoke("bench", "--model", str(checkpoint_dirs(name)), "--recipe", "fixed-interval(interval=2)",
                    "--prompts", str(prompts), "--limit", "1", "--seeds", "1", "--steps", "3",
                    *size_options(SIZES[name]), "--out", str(out))
    _succeeded(result)
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(row["recipe"], row["prompt"]) for row in rows] == [("baseline", "a red cube"), ("fixed-interval", "a red cube")]
    assert rows[1]["compute_fraction"] == pytest.approx(2 / 3) and rows[1]["psnr"] > 0
    report = (out / "report.md").read_text()
    assert str(checkpoint_dirs(name)) in report
    assert "- `fixed-interval`: `fixed-interval(interval=2, cooldown=0, warmup=1, budget=0.0" in report
    assert sorted(_files(out)) == ["pareto.png", "report.md", "results.jsonl", "samples.png"]


def test_bench_on_a_checkpoint_refuses_heldout_prompts_naming_the_file_option(checkpoint_dirs, tmp_path):
    result = invoke("bench", "--model", str(checkpoint_dirs("flux")), "--recipe", "fixed-interval",
                    "--out", str(tmp_path / "out"))
    _refused(result, "--prompts heldout", "reference models' own", "text file with one prompt per line")
    assert list(tmp_path.iterdir()) == []


def test_generate_says_when_a_sparse_pattern_had_too_few_tokens_to_skip_any(checkpoint_dirs, tmp_path):
    result = invoke("generate", "--model", str(checkpoint_dirs("flux")), "--prompt", "a red cube", "--steps", "3",
                    "--recipe", "sparse-window(density=0.25, dense_fraction=0)", *size_options(SIZES["flux"]),
                    "--out", str(tmp_path / "image.png"))
    _succeeded(result)
    assert "note: sparse-window: density=0.25 was asked, but every sparse attention call kept all key blocks" \
        in result.output


def test_generate_stops_where_the_latents_turn_non_finite_and_writes_nothing(checkpoint_dirs, tmp_path):
    """Finite weights large enough to overflow: the load check passes them, the first step's
    latents are Inf or NaN, and the generation stops there in one line."""
    import shutil

    from safetensors.torch import load_file, save_file

    directory = shutil.copytree(checkpoint_dirs("flux"), tmp_path / "checkpoint")
    weights = directory / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    tensors["proj_out.weight"].fill_(3e38)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    out = tmp_path / "out"
    result = invoke("generate", "--model", str(directory), "--prompt", "a red cube", "--steps", "3",
                    *size_options(SIZES["flux"]), "--out", str(out / "image.gif"))
    _refused(result, "the latents turned", "at step 1 of 3", "generation stopped")
    assert not out.exists() or _files(out) == []
