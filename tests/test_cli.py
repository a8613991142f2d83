"""The command line: ``cadence recipes`` documents every technique, every command has
help, and bad input is refused with one error line naming the bad value and what is
valid — before any model is loaded and before anything is written."""

import re
import time

import pytest
import torch
from click.testing import CliRunner

import cadence
import cadence.bench.runner  # noqa: F401  imported here so the timings below measure the command, not imports
import cadence.reference.pipelines  # noqa: F401
from cadence.accel.registry import load_builtin
from cadence.cli import main
from cadence.recipe import Recipe

FAST_SECONDS = 2.0  # a refusal is argument checking only; model loading alone takes longer


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


# -- recipes and help -----------------------------------------------------------------

def test_recipes_lists_fixed_interval_with_its_parameters_and_defaults():
    result = invoke("recipes")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.startswith("fixed-interval ") for line in lines)
    for param, default in (("interval", 2), ("warmup", 1), ("cooldown", 0)):
        assert any(re.match(rf"\s+{param}: int = {default}\b", line) for line in lines), param


def test_recipes_documents_every_registered_technique():
    output = invoke("recipes").output
    for name, technique in load_builtin().items():
        assert f"{name}  [{technique.config.level}]" in output
        for param, kind, default, _ in technique.config.describe():
            assert f"{param}: {kind} = {default!r}" in output


@pytest.mark.parametrize("family", ["wan", "flux", "sd3", "cogvideox", "hunyuan_video", "ltx", "ref-video",
                                    "WanTransformer3DModel"])
def test_recipes_model_shows_a_valid_default_recipe_and_its_evidence(family):
    result = invoke("recipes", "--model", family)
    assert result.exit_code == 0, result.output
    recipe = re.search(r'--recipe "(.*)"', result.output).group(1)
    assert "compile" in recipe and Recipe.parse(recipe)
    assert "measured:" in result.output and "needs:" in result.output


def test_a_students_default_is_its_teachers_without_the_step_policy():
    result = invoke("recipes", "--model", "ref-video-4step")
    assert result.exit_code == 0, result.output
    recipe = Recipe.parse(re.search(r'--recipe "(.*)"', result.output).group(1))
    teacher = Recipe.parse(re.search(r'--recipe "(.*)"', invoke("recipes", "--model", "ref-video").output).group(1))
    assert [c.name for c in recipe.techniques] == [c.name for c in teacher.techniques if c.level != "step"]
    assert any(c.level == "step" for c in teacher.techniques) and "4-step student" in result.output


def test_recipes_model_refuses_an_unknown_family_with_the_valid_ones():
    result = invoke("recipes", "--model", "unet")
    assert result.exit_code != 0
    assert "no default recipe for 'unet'; valid: cogvideox, flux, hunyuan_video, ltx, sd3, wan" in result.output
    assert "or a shipped student (ref-video-4step)" in result.output


def test_every_recipes_example_is_a_valid_recipe():
    examples = re.findall(r"--recipe '([^']*)'", invoke("recipes").output)
    assert len(examples) == len(load_builtin())
    for example in examples:
        assert Recipe.parse(example)


@pytest.mark.parametrize("args", [[]] + [[name] for name in sorted(main.commands)], ids=lambda a: " ".join(a) or "cadence")
def test_help_exits_zero(args):
    result = invoke(*args, "--help")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage:")
    assert "Traceback" not in result.output


# -- refusals -------------------------------------------------------------------------

@pytest.fixture
def no_model_loading(monkeypatch, tmp_path):
    """Record any call to cadence.load: a refusal must come before it. The baseline cache
    is pointed into tmp_path so that a write there would show."""
    calls = []

    def load(*args, **kwargs):
        calls.append(args)
        raise RuntimeError("cadence.load was called")

    monkeypatch.setattr(cadence, "load", load)
    monkeypatch.setenv("CADENCE_CACHE", str(tmp_path / "cache"))
    return calls


def _check_refused(result, seconds: float, fragments: list[str]) -> None:
    output = result.output
    assert "Traceback" not in output
    assert isinstance(result.exception, SystemExit), f"crashed with {result.exception!r}:\n{output}"
    assert result.exit_code != 0
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, output
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} missing from {errors[0]!r}"
    # Nothing but click's usage hint may surround the error line.
    others = [line for line in output.splitlines() if line.strip() and line not in errors]
    assert all(line.startswith(("Usage:", "Try ")) for line in others), output
    assert seconds < FAST_SECONDS


BENCH = ["bench", "--recipe", "fixed-interval"]
GENERATE = ["generate", "--prompt", "a red square"]
CALIBRATE = ["calibrate", "--technique", "teacache"]

# (arguments, fragments of the one error line: the bad value, then what is valid)
REFUSALS = {
    "unknown model": (["bench", "--model", "nope", "--recipe", "baseline"], ["'nope'", "'ref-video'", "'ref-image'"]),
    "unknown technique": (["bench", "--recipe", "nope"], ["'nope'", "fixed-interval"]),
    "out-of-range parameter": (["bench", "--recipe", "fixed-interval(interval=0)"], ["interval=0", ">= 1"]),
    "unknown parameter": (["bench", "--recipe", "fixed-interval(speed=2)"], ["'speed'", "interval, cooldown, warmup, budget"]),
    "missing recipe file": (["bench", "--recipe", "/nonexistent/fast.toml"], ["'/nonexistent/fast.toml'", "does not exist"]),
    "zero steps": ([*BENCH, "--steps", "0"], ["--steps 0", "positive integer"]),
    "zero seeds": ([*BENCH, "--seeds", "0"], ["--seeds 0", "positive integer"]),
    "zero limit": ([*BENCH, "--limit", "0"], ["--limit 0", "positive integer"]),
    "missing prompts file": ([*BENCH, "--prompts", "/nonexistent.txt"], ["'/nonexistent.txt'", "'heldout'"]),
    "generate empty prompt": (["generate", "--prompt", ""], ["prompt=''", "empty", "caption"]),
    "generate blank prompt": (["generate", "--prompt", "   "], ["prompt='   '", "empty"]),
    "generate zero steps": ([*GENERATE, "--steps", "0"], ["steps=0", "positive integer"]),
    "generate negative guidance": ([*GENERATE, "--guidance-scale", "-1"], ["guidance_scale=-1.0", ">= 0"]),
    "generate unknown technique": ([*GENERATE, "--recipe", "nope"], ["'nope'", "fixed-interval"]),
    "calibrate unknown technique": (["calibrate", "--technique", "nope"], ["'nope'", "magcache", "teacache"]),
    "calibrate uncalibrated technique": (["calibrate", "--technique", "fixed-interval"],
                                         ["'fixed-interval' has no calibration", "magcache", "teacache"]),
    "calibrate zero prompts": ([*CALIBRATE, "--prompts", "0"], ["--prompts 0", "positive integer"]),
    "calibrate one step": ([*CALIBRATE, "--steps", "1"], ["--steps 1", ">= 2"]),
    "calibrate negative guidance": ([*CALIBRATE, "--guidance-scale", "-1"], ["guidance_scale=-1.0", ">= 0"]),
    "calibrate unknown model": ([*CALIBRATE, "--model", "nope"], ["'nope'", "ref-video", "ref-image", "directory"]),
    # limits: values that cannot fit are refused with the limit named, before any allocation
    "bench steps over the limit": ([*BENCH, "--steps", "100000000"], ["steps=100000000", "limit of 1000"]),
    "generate steps over the limit": ([*GENERATE, "--steps", "100000000"], ["steps=100000000", "limit of 1000"]),
    "calibrate steps over the limit": ([*CALIBRATE, "--steps", "100000000"], ["steps=100000000", "limit of 1000"]),
    "seeds over the limit": ([*BENCH, "--seeds", "1000000000"], ["--seeds 1000000000", "limit of 1000"]),
    "limit over the limit": ([*BENCH, "--limit", "1000000000"], ["--limit 1000000000", "limit of 1000"]),
    "calibrate prompts over the limit": ([*CALIBRATE, "--prompts", "1000000000"], ["--prompts 1000000000", "limit of 1000"]),
    "generate size beyond memory": ([*GENERATE, "--height", "100000", "--width", "100000"],
                                    ["height=100000, width=100000", "GiB as float32", "memory"]),
    "bench frames beyond memory": ([*BENCH, "--frames", "100000000", "--height", "64", "--width", "64"],
                                   ["frames=100000000", "GiB as float32", "memory"]),
    "calibrate size beyond memory": ([*CALIBRATE, "--height", "1000000", "--width", "1000000"], ["GiB as float32"]),
    "generate seed out of range": ([*GENERATE, "--seed", str(2**64)], [f"seed={2**64}", "torch's generator"]),
    "generate negative height": ([*GENERATE, "--height", "-8"], ["--height -8", "positive integer"]),
    "generate frames of an image model": ([*GENERATE, "--model", "ref-image", "--frames", "4"],
                                          ["--frames 4", "ref-image makes images"]),
    "generate NaN guidance": ([*GENERATE, "--guidance-scale", "nan"], ["guidance_scale=nan", ">= 0"]),
    # recipes
    "generate empty recipe": ([*GENERATE, "--recipe", ""], ["recipe '' is empty", "'baseline'"]),
    "bench blank recipe": (["bench", "--recipe", "  "], ["recipe '  ' is empty", "'baseline'"]),
    "stray parenthesis": (["bench", "--recipe", "fixed-interval(interval=2))"],
                          ["'fixed-interval(interval=2))'", "stray ')' at character 27"]),
}


@pytest.mark.parametrize("args, fragments", REFUSALS.values(), ids=REFUSALS.keys())
def test_bad_input_is_refused_before_loading_and_writes_nothing(args, fragments, tmp_path, no_model_loading):
    out = tmp_path / "out"
    out_arg = str(out / "video.gif") if args[0] == "generate" else str(out)
    begin = time.perf_counter()
    result = invoke(*args, "--out", out_arg)
    _check_refused(result, time.perf_counter() - begin, fragments)
    assert no_model_loading == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [BENCH, GENERATE], ids=["bench", "generate"])
def test_unwritable_out_is_refused_before_loading(args, tmp_path, no_model_loading):
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = blocker / "out"
    out_arg = str(out / "video.gif") if args[0] == "generate" else str(out)
    begin = time.perf_counter()
    result = invoke(*args, "--out", out_arg)
    _check_refused(result, time.perf_counter() - begin, [repr(str(out)), "not writable"])
    assert no_model_loading == []
    assert list(tmp_path.iterdir()) == [blocker] and blocker.is_file()


def test_bench_negative_guidance_is_refused_before_loading(tmp_path, no_model_loading):
    begin = time.perf_counter()
    result = invoke(*BENCH, "--guidance-scale", "-1", "--out", str(tmp_path / "out"))
    _check_refused(result, time.perf_counter() - begin, ["guidance_scale=-1.0", ">= 0"])
    assert no_model_loading == []
    assert list(tmp_path.iterdir()) == []


def test_demo_zero_prompts_names_its_own_option(tmp_path, no_model_loading):
    begin = time.perf_counter()
    result = invoke("demo", "--prompts", "0", "--out", str(tmp_path / "out"))
    _check_refused(result, time.perf_counter() - begin, ["--prompts 0", "positive integer"])
    assert no_model_loading == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("device, fragment", [("foo", "'foo' is not a device"), ("cuda:0", "no CUDA device")])
def test_bad_device_is_refused_before_loading(tmp_path, no_model_loading, device, fragment):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = invoke("generate", "--prompt", "a red square", "--device", device, "--out", str(tmp_path / "x.gif"))
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert fragment in result.output and "cpu" in result.output
    assert no_model_loading == []


def test_calibrate_unwritable_out_is_refused_before_loading(tmp_path, no_model_loading):
    blocker = tmp_path / "file"
    blocker.write_text("")
    begin = time.perf_counter()
    result = invoke(*CALIBRATE, "--out", str(blocker / "teacache.json"))
    _check_refused(result, time.perf_counter() - begin, [repr(str(blocker)), "not writable"])
    assert no_model_loading == []


def test_calibrate_fits_on_training_captions_and_writes_where_asked(tmp_path):
    from cadence.accel import calibration
    from cadence.reference import data

    out = tmp_path / "teacache.json"
    result = invoke(*CALIBRATE, "--model", "ref-image", "--prompts", "1", "--steps", "5", "--device", "cpu",
                    "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "coefficients" in result.output and f"wrote {out}" in result.output
    fitted = calibration.load(cadence.load("ref-image", text_encoder=False).transformer, "teacache", str(out))
    assert fitted["steps"] == 5 and fitted["guidance_scale"] == 4.0 and len(fitted["coefficients"]) == 5
    assert fitted["prompts"] == data.train_captions(1, video=False)
    assert not set(fitted["prompts"]) & set(data.heldout_prompts(32, video=False))


@pytest.mark.parametrize("out, fragments", [
    ("clip.txt", ["clip.txt'", ".gif, .mp4, .png", "not '.txt'"]),
    ("clip", ["clip'", "no extension"]),
])
def test_generate_refuses_an_output_format_it_cannot_write_before_any_work(out, fragments, tmp_path, no_model_loading):
    begin = time.perf_counter()
    result = invoke(*GENERATE, "--out", str(tmp_path / out))
    _check_refused(result, time.perf_counter() - begin, [str(tmp_path), *fragments])
    assert no_model_loading == []
    assert list(tmp_path.iterdir()) == []


def test_generate_refuses_mp4_without_ffmpeg_before_any_work(tmp_path, no_model_loading):
    import importlib.util

    if importlib.util.find_spec("imageio_ffmpeg") is not None:
        pytest.skip("ffmpeg is installed here")
    result = invoke(*GENERATE, "--out", str(tmp_path / "clip.mp4"))
    _check_refused(result, 0.0, ["clip.mp4", "needs ffmpeg", ".gif"])
    assert no_model_loading == [] and list(tmp_path.iterdir()) == []


def test_generate_writes_no_half_file_when_writing_fails(tmp_path, monkeypatch, checkpoint_dirs):
    """The clip is written under a temporary name and renamed: a write that fails half way
    leaves neither the file asked for nor the partial one."""
    from cadence.bench import report

    def write_half(path, video, **kwargs):
        path.write_bytes(b"GIF89a")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report, "write_video", write_half)
    result = invoke(*GENERATE, "--model", str(checkpoint_dirs("flux")), "--steps", "1", "--height", "16", "--width",
                    "16", "--device", "cpu", "--out", str(tmp_path / "image.gif"))
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: cannot write {tmp_path / 'image.gif'}: No space left on device"], result.output
    assert list(tmp_path.iterdir()) == []
