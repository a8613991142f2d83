"""The search space comes from the registry, and the split of prompts is explicit and disjoint."""

import optuna
import pytest
import torch

from cadence.accel.attention import kernels
from cadence.accel.registry import LEVELS, load_builtin
from cadence.recipe import Recipe
from cadence.tune import realsize
from cadence.tune.cost import CostModel
from cadence.tune.prompts import split_prompts
from cadence.tune.settings import TuneSettings
from cadence.tune.space import (
    CUDA_ONLY_BACKENDS,
    NONE,
    REFERENCE_BACKENDS,
    STREAM_ONLY_LEVELS,
    SearchSpace,
    features,
    fp4_left_out,
    is_fp4,
    is_peer,
    native_linear_format,
    unusable_backends,
)


def test_every_registered_technique_but_the_peers_is_searched_at_its_level():
    space = SearchSpace.from_registry(device="cuda", compile=True)
    techniques = load_builtin()
    assert set(space.choices) == set(LEVELS)
    fp4_out = fp4_left_out("cuda") is not None  # on a GPU without FP4 tensor cores (the H200)
    for name, technique in techniques.items():
        searched = name in space.choices[technique.config.level] or name in space.late
        expected = not is_peer(technique.config) and technique.config.level not in STREAM_ONLY_LEVELS
        assert searched == (expected and not (fp4_out and is_fp4(technique.config))), name
    assert all(names[0] == NONE for names in space.choices.values())


def test_compile_is_left_out_on_the_cpu_with_the_reason_and_taken_when_asked():
    cpu = SearchSpace.from_registry(device="cpu")
    assert "compile" not in cpu.late and any("compile" in note for note in cpu.notes)
    assert SearchSpace.from_registry(device="cpu", compile=True).late == ("compile",)


def test_compile_is_not_searched_but_added_to_the_confirmed_candidates():
    space = SearchSpace.from_registry(device="cuda")
    assert space.choices["graph"] == (NONE,) and space.late == ("compile",)
    assert any("compile not searched" in note for note in space.notes) and "added at the confirmation" in space.describe()
    assert space.with_late(Recipe.parse("magcache(budget=0.3)")) == Recipe.parse("magcache(budget=0.3) + compile")
    assert space.with_late(Recipe.parse("magcache(budget=0.3) + compile")) is None and space.with_late(Recipe()) is None
    shipped = Recipe.parse("magcache(budget=0.3) + compile + attention-backend(backend='sage')")
    assert space.restrict(shipped) == shipped  # the held-out check compares with the whole shipped default
    assert space.params_of(shipped)["graph"] == NONE
    with pytest.raises(ValueError, match="compile alone is not searched"):
        SearchSpace.from_registry(include=("compile",), device="cuda")


def test_include_narrows_and_may_name_a_peer_exclude_removes():
    space = SearchSpace.from_registry(include=("magcache", "diffusers-fbcache", "fp8"))
    assert space.choices["step"] == (NONE, "diffusers-fbcache", "magcache")
    assert space.choices["bit"] == (NONE, "fp8") and space.choices["token"] == (NONE,)
    assert "magcache" not in SearchSpace.from_registry(exclude=("magcache",)).choices["step"]


@pytest.mark.parametrize("option", ["include", "exclude"])
def test_an_unknown_technique_is_refused_naming_it_and_the_valid_ones(option):
    with pytest.raises(ValueError, match=rf"--{option} names unknown technique\(s\) 'magcash'; valid: .*magcache"):
        SearchSpace.from_registry(**{option: ("magcache", "magcash")})


def test_a_space_with_nothing_left_is_refused():
    with pytest.raises(ValueError, match="search space is empty"):
        SearchSpace.from_registry(include=("compile",), compile=False)


def test_suggested_candidates_are_valid_recipes_and_known_ones_map_back():
    space = SearchSpace.from_registry(include=("magcache", "sparse-window", "attention-backend", "fp8"))
    shipped = Recipe.parse("magcache(budget=0.3) + attention-backend(backend='sage')")
    recipe = space.suggest(optuna.trial.FixedTrial(space.params_of(shipped)))
    assert recipe == shipped
    forecasting = Recipe.parse("magcache(budget=0.25, forecast=1)")
    assert space.suggest(optuna.trial.FixedTrial(space.params_of(forecasting))) == forecasting
    assert features(forecasting)["forecast"] == 1.0 and "forecast" not in features(shipped)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        recipe = space.suggest(study.ask())
        assert isinstance(recipe, Recipe)
        for config in recipe.techniques:
            for knob in ("budget", "density"):
                assert 0.1 <= getattr(config, knob, 0.5) <= 0.9


def test_a_sparse_patterns_precision_is_searched_on_a_gpu_only():
    low_bit = Recipe.parse("sparse-window(density=0.5, precision='int8')")
    gpu = SearchSpace.from_registry(include=("sparse-window",), device="cuda")
    assert gpu.params_of(low_bit)["precision"] == "int8"
    assert gpu.suggest(optuna.trial.FixedTrial(gpu.params_of(low_bit))) == low_bit
    assert features(low_bit)["precision:int8"] == 1.0 and "precision" in gpu.describe()
    cpu = SearchSpace.from_registry(include=("sparse-window",), device="cpu")
    assert "precision" not in cpu.params_of(low_bit) and "precision" not in cpu.describe()
    suggested = cpu.suggest(optuna.trial.FixedTrial({**cpu.params_of(low_bit), "precision": "int8"}))
    assert suggested == Recipe.parse("sparse-window(density=0.5)")  # the CPU runs its emulation: never searched


def test_restrict_drops_what_the_space_leaves_out():
    space = SearchSpace.from_registry(device="cpu")
    assert str(space.restrict(Recipe.parse("magcache(budget=0.3) + compile"))) == "magcache(budget=0.3)"


def test_the_cost_model_skips_only_a_candidate_it_knows_to_be_slower():
    model = CostModel()
    for budget in (0.2, 0.3, 0.5, 0.7, 0.9):
        model.add(features(Recipe.parse(f"magcache(budget={budget})")), 0.1 + 0.9 * budget)
        model.add(features(Recipe.parse(f"magcache(budget={budget}) + fp8")), 3 * (0.1 + 0.9 * budget))
    slow = features(Recipe.parse("magcache(budget=0.5) + fp8"))
    assert "cost model: predicted" in model.cannot_win(slow, best=0.4)
    assert model.cannot_win(features(Recipe.parse("magcache(budget=0.25)")), best=0.4) is None
    assert model.cannot_win(features(Recipe.parse("magcache(budget=0.5) + int8")), best=0.4) is None  # never seen


def test_the_split_keeps_tuning_and_check_prompts_and_seeds_apart(tmp_path):
    split = split_prompts("heldout", video=True, tuning=3, check=2, seeds=2)
    assert len(split.tuning) == 3 and len(split.check) == 2 and not set(split.tuning) & set(split.check)
    assert split.tuning_seeds == (0, 1) and split.check_seeds == (2, 3)
    assert not set(split.tuning_cases) & set(split.check_cases)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"prompt {i}" for i in range(8)) + "\nprompt 0\n")
    from_file = split_prompts(str(prompts), video=True, tuning=10, check=10, seeds=1)
    assert from_file.check == ("prompt 6", "prompt 7") and from_file.tuning == tuple(f"prompt {i}" for i in range(6))


def test_the_confirmation_prompts_are_neither_tuning_nor_check_prompts():
    split = split_prompts("heldout", video=True, tuning=4, check=2, seeds=2, confirm=2)
    assert len(split.confirm) == 2 and not set(split.confirm) & (set(split.tuning) | set(split.check))
    assert split.confirm_cases == [(p, s) for p in split.confirm for s in (0, 1)]
    listed = [f"prompt {i}" for i in range(12)]
    from_list = split_prompts(listed, video=True, tuning=10, check=10, seeds=1, confirm=5)
    assert from_list.check == tuple(listed[9:]) and from_list.confirm == tuple(listed[7:9])  # a quarter of the rest
    two = split_prompts(listed[:2], video=True, tuning=1, check=1, seeds=1, confirm=2)
    assert two.confirm == () and two.confirm_cases == two.tuning_cases  # no prompt left: the tuning cases again
    with pytest.raises(ValueError, match="confirmation prompts=-1"):
        split_prompts("heldout", video=True, tuning=1, check=1, seeds=1, confirm=-1)


def test_a_prompt_file_too_short_to_split_is_refused(tmp_path):
    prompts = tmp_path / "one.txt"
    prompts.write_text("a red square\n")
    with pytest.raises(ValueError, match="holds 1 prompt.*at least 2"):
        split_prompts(str(prompts), video=True, tuning=2, check=2, seeds=1)


class _TinyAttention(torch.nn.Module):
    """What the probe reads off a model: its first attention module's heads and Q projection
    (diffusers' Attention), here 2 heads of 64."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.heads = 2
        self.to_q = torch.nn.Linear(8, 128, dtype=dtype)


def _failing(monkeypatch, failing: set[str]) -> list:
    """kernels.dense as the H200 answered a float32 model for ``failing``; the calls it saw."""
    from cadence.tune import space as space_module

    calls = []

    def dense(query, key, value, backend="auto", **kwargs):
        calls.append((backend, query.shape, query.dtype))
        if backend in failing:
            raise RuntimeError("No available kernel. Aborting execution.\nmore detail")
        return query

    monkeypatch.setattr(space_module.kernels, "dense", dense)
    return calls


def test_a_dense_backend_that_fails_on_the_model_is_left_out_with_its_error(monkeypatch):
    calls = _failing(monkeypatch, {"flash", "cudnn"})
    space = SearchSpace.from_registry(include=("attention-backend", "magcache"), device="cuda", model=_TinyAttention())
    # every backend the device has but SDPA's reference one, left out on CUDA before the probe
    assert {backend for backend, _, _ in calls} == set(kernels.DENSE_BACKENDS) - set(REFERENCE_BACKENDS)
    assert all(shape[-1] == 64 and dtype == torch.float32 for _, shape, dtype in calls)  # the model's head size
    assert "attention-backend backend 'flash' left out: it fails on this model's float32 attention: RuntimeError: " \
           "No available kernel. Aborting execution." in space.notes
    assert set(space.backends) == set(kernels.DENSE_BACKENDS) - {"flash", "cudnn", "math"}
    assert "attention-backend" in space.choices["token"] and "cudnn/flash left out" in space.describe()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    proposed = {getattr(config, "backend", None) for _ in range(40) for config in space.suggest(study.ask()).techniques}
    assert proposed - {None} <= set(space.backends) and len(proposed - {None}) > 1


def test_a_recipe_on_a_failing_default_backend_is_not_enqueued_or_compared(monkeypatch):
    _failing(monkeypatch, {"cudnn"})  # attention-backend's default
    space = SearchSpace.from_registry(include=("attention-backend", "magcache"), device="cuda", model=_TinyAttention())
    default_backend = Recipe.parse("magcache(budget=0.3) + attention-backend")
    assert space.params_of(default_backend)["token"] == NONE and "backend" not in space.params_of(default_backend)
    assert space.restrict(default_backend) == Recipe.parse("magcache(budget=0.3)")
    sage = Recipe.parse("magcache(budget=0.3) + attention-backend(backend='sage')")
    assert space.restrict(sage) == sage and space.suggest(optuna.trial.FixedTrial(space.params_of(sage))) == sage


def test_a_dense_technique_with_no_backend_left_is_left_out_and_the_level_keeps_the_others(monkeypatch):
    _failing(monkeypatch, set(kernels.DENSE_BACKENDS))
    space = SearchSpace.from_registry(include=("attention-backend", "sparse-window"), model=_TinyAttention())
    assert space.choices["token"] == (NONE, "sparse-window")
    assert "attention-backend left out: none of its backends runs on this model" in space.notes
    with pytest.raises(ValueError, match="search space is empty"):
        SearchSpace.from_registry(include=("attention-backend",), model=_TinyAttention())


def test_the_probe_runs_the_real_kernels_and_keeps_every_cpu_backend_on_a_float32_model():
    space = SearchSpace.from_registry(include=("attention-backend",), device="cpu", model=_TinyAttention())
    assert set(space.backends) == set(kernels.DENSE_BACKENDS) - set(CUDA_ONLY_BACKENDS)
    assert not any("left out: it fails" in note for note in space.notes) and "left out: they" not in space.describe()
    failing = unusable_backends(_TinyAttention(), ("auto", "efficient"))  # no efficient kernel on the CPU
    assert set(failing) == {"efficient"} and failing["efficient"].startswith("RuntimeError: ")


def _cuda_device(monkeypatch, capability: tuple[int, int], name: str) -> None:
    """This process sees one CUDA device of ``capability`` (none is needed: the space only asks)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


def test_fp4_is_left_out_on_a_gpu_without_fp4_tensor_cores_with_the_reason(monkeypatch):
    _cuda_device(monkeypatch, (9, 0), "NVIDIA H200")
    fp4 = sorted(name for name, technique in load_builtin().items() if is_fp4(technique.config))
    assert fp4 == ["mxfp4", "nvfp4"]  # found from their formats in the registry, not listed here
    hopper = SearchSpace.from_registry(device="cuda")
    assert not set(fp4) & set(hopper.choices["bit"]) and {"fp8", "int8"} <= set(hopper.choices["bit"])
    assert (
        "mxfp4, nvfp4 left out: NVIDIA H200 (compute capability 9.0) has no FP4 tensor cores (from 10.0, Blackwell): "
        "FP4 runs simulated there, slower than bf16; --include names them to search them all the same"
    ) in hopper.notes
    assert hopper.params_of(Recipe.parse("magcache(budget=0.3) + nvfp4"))["bit"] == NONE  # not enqueued either
    named = SearchSpace.from_registry(include=("nvfp4", "magcache"), device="cuda")  # asked for: searched
    assert "nvfp4" in named.choices["bit"] and not any("left out: NVIDIA" in note for note in named.notes)


def test_fp4_stays_on_blackwell_and_on_the_cpu(monkeypatch):
    _cuda_device(monkeypatch, (10, 0), "NVIDIA B200")
    assert {"nvfp4", "mxfp4"} <= set(SearchSpace.from_registry(device="cuda").choices["bit"])
    _cuda_device(monkeypatch, (9, 0), "NVIDIA H200")
    cpu = SearchSpace.from_registry(device="cpu")  # every format is emulated on the CPU: today's space
    assert {"nvfp4", "mxfp4"} <= set(cpu.choices["bit"]) and fp4_left_out("cpu") is None


def test_the_math_backend_is_left_out_on_cuda_with_the_reason_and_no_include_brings_it_back(monkeypatch):
    calls = _failing(monkeypatch, set())
    sampled = SearchSpace.from_registry(include=("attention-backend", "magcache"), device="cuda",
                                        model=_TinyAttention())
    assert REFERENCE_BACKENDS == ("math",) and "math" not in sampled.backends
    assert "math" not in {backend for backend, _, _ in calls}  # not even probed
    assert set(sampled.backends) == set(kernels.DENSE_BACKENDS) - {"math"}
    note = ("attention-backend backend 'math' left out: SDPA's reference kernel, which materialises every query-key "
            "score: on CUDA never faster than the fused kernels; --include names techniques, not backends, so no "
            "option searches it (a recipe naming it still runs it)")
    assert note in sampled.notes  # include named the technique: its backends are not named
    assert "(math left out on CUDA: SDPA's reference kernel; see the notes)" in sampled.describe()
    math = Recipe.parse("magcache(budget=0.3) + attention-backend(backend='math')")
    assert sampled.params_of(math)["token"] == NONE and sampled.restrict(math) == Recipe.parse("magcache(budget=0.3)")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    proposed = {getattr(c, "backend", None) for _ in range(60) for c in sampled.suggest(study.ask()).techniques}
    assert "math" not in proposed and {"sage", "flex"} <= proposed
    without_a_dense_technique = SearchSpace.from_registry(include=("magcache",), device="cuda")
    assert not any("'math'" in line for line in without_a_dense_technique.notes)  # no note on what is not searched


def test_the_math_backend_stays_on_the_cpu():
    cpu = SearchSpace.from_registry(include=("attention-backend",), device="cpu", model=_TinyAttention())
    assert "math" in cpu.backends and not any("'math'" in note for note in cpu.notes)
    assert "math left out" not in cpu.describe()


def test_with_speed_at_mixed_is_left_out_with_the_reason_and_searched_when_included():
    assert [name for name, technique in load_builtin().items() if not realsize.timable(technique)] == ["mixed"]
    assert "mixed" in SearchSpace.from_registry(device="cpu").choices["bit"]  # timed on the tuned model: it stays
    timed_there = SearchSpace.from_registry(device="cpu", speed_at="wan2.1-1.3b")
    assert "mixed" not in timed_there.choices["bit"] and {"fp8", "int8"} <= set(timed_there.choices["bit"])
    assert ("mixed left out: candidates are timed at wan2.1-1.3b, where its sensitivity calibration, made for the "
            "tuned model only, cannot be read and it has no calibration-free form; --include names it to search it all "
            "the same") in timed_there.notes
    assert timed_there.params_of(Recipe.parse("magcache(budget=0.3) + mixed"))["bit"] == NONE  # not enqueued either
    named = SearchSpace.from_registry(include=("mixed", "magcache"), device="cpu", speed_at="wan2.1-1.3b")
    assert named.choices["bit"] == (NONE, "mixed") and not any("mixed left out" in note for note in named.notes)


def test_the_settings_build_the_space_with_speed_at_and_an_unknown_real_size_is_refused(tmp_path):
    all_but_mixed = tuple(name for name in load_builtin() if name != "mixed")
    TuneSettings(out=tmp_path, exclude=all_but_mixed).check()  # mixed alone: searched on the tuned model
    with pytest.raises(ValueError, match="search space is empty"):  # and left out when timed at the real size
        TuneSettings(out=tmp_path, exclude=all_but_mixed, speed_at="wan2.1-1.3b").check()
    with pytest.raises(ValueError, match=r"--speed-at 'wan9' is not a known real size; valid: wan2.1-1.3b .*flux"):
        SearchSpace.from_registry(speed_at="wan9")


@pytest.mark.parametrize("capability, expected", [((9, 0), "fp8"), ((8, 9), "fp8"), ((10, 0), "fp8"),
                                                  ((8, 6), "int8"), ((8, 0), "int8"), ((7, 5), "int8")])
def test_the_native_linear_format_follows_the_compute_capability(monkeypatch, capability, expected):
    _cuda_device(monkeypatch, capability, "a GPU")
    assert native_linear_format("cuda") == expected and native_linear_format("cuda:0") == expected
    assert native_linear_format("cpu") is None


def test_no_native_linear_format_where_cuda_cannot_be_queried(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert native_linear_format("cuda") is None
