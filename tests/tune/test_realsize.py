"""cadence tune --speed-at: per-step times measured on a (here tiny) real-size transformer, one
measure per per-forward part, and a search whose speeds are modelled from them."""

import json
import re
import types

import optuna
import pytest
import torch
from click.testing import CliRunner
from diffusers import WanTransformer3DModel
from tiny_checkpoints import WAN_SIZE, tiny_wan_pipeline

from cadence.accel.registry import load_builtin
from cadence.cli import main
from cadence.recipe import Recipe
from cadence.tune import TuneRefused, TuneSettings, realsize, tune
from cadence.tune import quality as quality_module
from cadence.tune import search as search_module
from cadence.tune.search import STUDY
from cadence.tune.space import SearchSpace, is_peer

# A "real size" small enough for the CPU: Wan's classes, 2 x 8 x 8 latents (32 tokens).
TINY = realsize.RealSize(
    "tiny-wan-real",
    WanTransformer3DModel,
    {
        "patch_size": (1, 2, 2),
        "num_attention_heads": 2,
        "attention_head_dim": 12,
        "in_channels": 16,
        "out_channels": 16,
        "text_dim": 16,
        "freq_dim": 16,
        "ffn_dim": 32,
        "num_layers": 2,
        "rope_max_seq_len": 32,
    },
    {"frames": 2, "height": 8, "width": 8},
    text_tokens=8,
    text_dim=16,
    described="tiny Wan, 2 x 8 x 8 latents",
)
MATH = "attention-backend(backend='math')"
PROMPTS = [
    "a red square moves left",
    "a blue circle moves up",
    "a green star moves right",
    "a white triangle",
]


@pytest.fixture(autouse=True)
def tiny_spec(monkeypatch):
    monkeypatch.setitem(realsize.SPECS, TINY.name, TINY)


@pytest.fixture
def speed(tiny_spec):
    measure = realsize.SpeedAt(TINY, "cpu", 4.0, progress=lambda line: None)
    forwards = []
    measure.pipe.transformer.register_forward_pre_hook(lambda *_: forwards.append(1))
    measure.forwards = forwards
    return measure


def test_a_part_is_measured_once_then_read_from_the_cache(speed):
    first = speed.per_step_seconds(Recipe.parse(MATH))
    # one warm-up and one timed generation of SPEED_STEPS steps, two forwards a step (CFG)
    assert len(speed.forwards) == 2 * realsize.SPEED_STEPS * 2 and first > 0
    assert speed.per_step_seconds(Recipe.parse(MATH)) == first
    assert len(speed.forwards) == 2 * realsize.SPEED_STEPS * 2  # the pipeline did not run again
    assert [row.part for row in speed.rows()] == [MATH] and speed.rows()[0].warm_up_seconds > 0


def test_the_empty_part_is_the_baseline_and_step_terms_are_left_out(speed):
    baseline = speed.per_step_seconds(Recipe())
    assert speed.relative_time(Recipe(), None) == 1.0  # the baseline, no step policy: exactly its own time
    measured = len(speed.forwards)
    assert speed.per_step_seconds(Recipe.parse("fixed-interval(budget=0.4)")) == baseline  # a step policy alone
    assert len(speed.forwards) == measured and [row.part for row in speed.rows()] == [""]
    assert speed.relative_time(Recipe.parse("fixed-interval(budget=0.4)"), 0.4) == pytest.approx(0.4, rel=1e-12)
    assert realsize.per_forward_part(Recipe.parse(f"fixed-interval(budget=0.4) + {MATH}")) == Recipe.parse(MATH)
    both = speed.relative_time(Recipe.parse(f"fixed-interval(budget=0.4) + {MATH}"), 0.5)
    assert both == speed.per_step_seconds(Recipe.parse(MATH)) * 0.5 / baseline
    assert [row.part for row in speed.rows()] == ["", MATH]


def _forward_inputs() -> dict:
    """One forward's inputs for the tiny real size (fixed: a measure must give the model back exactly)."""
    generator = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 16, 2, 8, 8, generator=generator).bfloat16(),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 8, 16, generator=generator).bfloat16(),
        "return_dict": False,
    }


def test_a_measure_gives_back_the_exact_model(speed):
    transformer = speed.pipe.transformer
    inputs = _forward_inputs()
    with torch.no_grad():
        before = transformer(**inputs)[0]
        speed.per_step_seconds(Recipe.parse(f"fixed-interval(budget=0.4) + {MATH}"))
        after = transformer(**inputs)[0]
    assert torch.equal(before, after)
    assert len(transformer._forward_pre_hooks) == 1  # the test's own counter, nothing of the measure's


def test_an_unknown_real_size_is_refused_naming_the_valid_ones(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"--speed-at 'wan2\.2-5b' is not a known real size; valid: wan2\.1-1\.3b "
        r"\(Wan2\.1-T2V-1\.3B, 480 x 832 x 81 frames.*flux\.1-dev",
    ):
        TuneSettings(out=tmp_path, speed_at="wan2.2-5b").check()
    result = CliRunner().invoke(
        main,
        [
            "tune",
            "--model",
            "ref-video",
            "--speed-at",
            "wan2.2-5b",
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert result.exit_code != 0 and "--speed-at 'wan2.2-5b' is not a known real size; valid:" in result.output


def test_another_familys_real_size_is_refused_naming_both(tmp_path):
    with pytest.raises(
        TuneRefused,
        match="--speed-at flux.1-dev times a FluxTransformer2DModel, but the tuned model's "
        "transformer is a WanTransformer3DModel; valid for it: wan2.1-1.3b",
    ):
        tune(tiny_wan_pipeline(), settings(tmp_path, speed_at="flux.1-dev"))
    assert not (tmp_path / "study.db").exists()  # refused before any work
    result = CliRunner().invoke(
        main,
        [
            "tune",
            "--model",
            "ref-image",
            "--speed-at",
            "wan2.1-1.3b",
            "--out",
            str(tmp_path / "out"),
        ],
    )
    assert (
        result.exit_code != 0
        and (
            "--speed-at wan2.1-1.3b times a WanTransformer3DModel, but the tuned model's "
            "transformer is a FluxTransformer2DModel; valid for it: flux.1-dev"
        )
        in result.output
    )


def settings(out, **changes) -> TuneSettings:
    base = dict(
        out=out,
        min_psnr=20.0,
        steps=4,
        seeds=1,
        tuning_prompts=1,
        check_prompts=1,
        prompts=PROMPTS,
        time_budget=600.0,
        trials=1,
        include=("fixed-interval", "attention-backend"),
        model="tiny-wan",
        **WAN_SIZE,
    )
    return TuneSettings(**{**base, **changes})


# Per-step seconds of each part at the "real size", set rather than measured: the study's
# figures are then known exactly.
PER_STEP = {"": 1.0, MATH: 0.5}


def test_a_study_ranks_candidates_by_their_speed_modelled_at_the_real_size(tmp_path, monkeypatch):
    monkeypatch.setattr(
        realsize.SpeedAt,
        "_measure",
        lambda self, part, key: realsize.PartTime(key, PER_STEP[key], 2.0),
    )
    # the confirmation asks for a speedup over the baseline: here the modelled one, whatever the CPU's load
    monkeypatch.setattr(
        search_module,
        "default_recipe",
        lambda name: types.SimpleNamespace(recipe=f"fixed-interval(budget=0.5) + {MATH}"),
    )
    pipe = tiny_wan_pipeline()
    asked = settings(tmp_path, speed_at=TINY.name)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name=STUDY)
    study.set_user_attr("settings", asked.identity())
    study.enqueue_trial(
        SearchSpace.from_registry(include=asked.include).params_of(Recipe.parse(f"fixed-interval(budget=0.3) + {MATH}"))
    )
    result = tune(pipe, asked)
    trial = result.trials[0]
    share = trial.user_attrs["computed_share"]
    assert 0 < share < 1 and trial.value == pytest.approx(0.5 * share)  # 0.5 s / 1.0 s per step x the share
    assert trial.user_attrs["measured_relative_time"] > 0  # the tuned model's own time is kept, not used
    assert result.speed_at == TINY.name and [p.part for p in result.part_times] == [
        "",
        MATH,
    ]
    check = json.loads((tmp_path / "check.json").read_text())["check"]["recipes"]
    for entry in check.values():  # the tuned recipe and the shipped default, both modelled
        assert entry["speedup"] == pytest.approx(1 / (0.5 * entry["computed_share"]))
        assert entry["measured_speedup"] > 0
    assert set(check) == {"tuned", "shipped default"}
    report = (tmp_path / "report.md").read_text()
    assert f"speedup (modelled at {TINY.name} from measured per-step times)" in report
    assert "| `baseline` | 1000.0 | 2.0 |" in report and f"| `{MATH}` | 500.0 | 2.0 |" in report


def test_with_speed_at_the_tuned_models_times_reject_nothing(tmp_path, monkeypatch):
    """A candidate four times slower than the baseline on the tuned model, modelled faster at
    the real size, is measured to the end and kept."""
    monkeypatch.setattr(
        realsize.SpeedAt,
        "_measure",
        lambda self, part, key: realsize.PartTime(key, PER_STEP[key], 0.0),
    )
    monkeypatch.setattr(search_module, "SLOW_MARGIN", 0.25)
    monkeypatch.setattr(search_module, "STOP_FACTOR", 2.0)
    monkeypatch.setattr(
        search_module,
        "holds",
        lambda measures, entry: (
            entry["quality"] is not None and quality_module.meets(measures, entry["quality"], within_margin=False)
        ),
    )
    from cadence.tune import evaluate as evaluate_module

    original = evaluate_module.Evaluator.run

    def slow(self, recipe, case, deadline=None):
        row = original(self, recipe, case, deadline)
        row["seconds"] *= 40  # far past the tuned model's stop (2x) and slow (1.25x) rules
        return row

    monkeypatch.setattr(evaluate_module.Evaluator, "run", slow)
    asked = settings(tmp_path, speed_at=TINY.name, include=("fixed-interval",))
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name=STUDY)
    study.set_user_attr("settings", asked.identity())
    study.enqueue_trial(
        SearchSpace.from_registry(include=asked.include).params_of(Recipe.parse("fixed-interval(budget=0.3)"))
    )
    result = tune(tiny_wan_pipeline(), asked)
    trial = result.trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.user_attrs["measured_relative_time"] > 1.25
    assert trial.value == pytest.approx(trial.user_attrs["computed_share"])  # no per-forward part: the share alone


def _first_trial_of_a_refused_study(tmp_path) -> optuna.trial.FrozenTrial:
    """A --speed-at study whose one candidate is the MATH backend alone: it ends refused (no
    candidate met the bar); its first trial says why that candidate was rejected."""
    asked = settings(tmp_path, speed_at=TINY.name)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name=STUDY)
    study.set_user_attr("settings", asked.identity())
    study.enqueue_trial(SearchSpace.from_registry(include=asked.include).params_of(Recipe.parse(MATH)))
    with pytest.raises(TuneRefused):
        tune(tiny_wan_pipeline(), asked)
    return optuna.load_study(study_name=STUDY, storage=storage).trials[0]


def test_a_candidate_without_a_step_policy_modelled_slower_is_rejected_before_it_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(
        realsize.SpeedAt,
        "_measure",
        lambda self, part, key: realsize.PartTime(key, {"": 1.0, MATH: 3.0}[key], 0.0),
    )
    from cadence.tune import evaluate as evaluate_module

    runs = []
    original = evaluate_module.Evaluator.run
    monkeypatch.setattr(
        evaluate_module.Evaluator,
        "run",
        lambda self, recipe, case, deadline=None: runs.append(str(recipe)) or original(self, recipe, case, deadline),
    )
    trial = _first_trial_of_a_refused_study(tmp_path)
    assert trial.state == optuna.trial.TrialState.PRUNED and runs == []
    assert trial.user_attrs["rejected"] == (
        f"time: modelled at {TINY.name} 3.00x the baseline's (no step policy), the time to beat is 1.00x"
    )


def test_an_image_real_size_runs_through_the_image_pipeline():
    from diffusers import FluxTransformer2DModel

    config = {
        **realsize.SPECS["flux.1-dev"].config,
        "num_layers": 1,
        "num_single_layers": 1,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 32,
        "axes_dims_rope": (4, 4, 8),
    }
    tiny_flux = realsize.RealSize(
        "tiny-flux",
        FluxTransformer2DModel,
        config,
        {"height": 8, "width": 8},
        8,
        32,
        32,
    )
    speed = realsize.SpeedAt(tiny_flux, "cpu", 4.0, progress=lambda line: None)
    forwards = []
    speed.pipe.transformer.register_forward_pre_hook(lambda *_: forwards.append(1))
    assert speed.per_step_seconds(Recipe()) > 0 and len(forwards) == 2 * realsize.SPEED_STEPS * 2


def test_the_real_size_is_part_of_the_study_identity(tmp_path):
    asked = settings(tmp_path, speed_at=TINY.name)
    assert asked.identity()["speed_at"] == TINY.name and "speed_at" not in settings(tmp_path).identity()
    optuna.create_study(storage=f"sqlite:///{tmp_path / 'study.db'}", study_name=STUDY).set_user_attr(
        "settings", asked.identity()
    )
    with pytest.raises(
        TuneRefused,
        match=r"other settings \(speed_at differ: speed_at='tiny-wan-real'\)",
    ):
        tune(tiny_wan_pipeline(), settings(tmp_path))


def test_a_real_size_that_cannot_run_here_is_refused_with_the_baselines_kept(tmp_path, monkeypatch):
    def out_of_memory(self, part, key):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(realsize.SpeedAt, "_measure", out_of_memory)
    with pytest.raises(
        TuneRefused,
        match=r"--speed-at tiny-wan-real: the unaccelerated real-size transformer cannot "
        r"run on cpu: RuntimeError: CUDA out of memory; the baselines made are kept",
    ):
        tune(tiny_wan_pipeline(), settings(tmp_path, speed_at=TINY.name))
    assert any((tmp_path / "baselines").iterdir())


@pytest.mark.filterwarnings("ignore:int8. no fast kernel on cpu")
def test_int8_at_its_defaults_is_timed_in_its_calibration_free_form(speed, tmp_path):
    """int8's default smooth=0.5 needs an activation calibration, made for the tuned model
    and refused on any other: the real size times int8(smooth=0) instead, for the recipe at
    its defaults and for the recipe pointed at the tuned model's calibration alike."""
    made_for_another_model = tmp_path / "activations.json"
    made_for_another_model.write_text(json.dumps({"technique": "activations", "model": {"class": "Tuned"}}))
    transformer = speed.pipe.transformer
    inputs = _forward_inputs()
    with torch.no_grad():
        before = transformer(**inputs)[0]
        seconds = speed.per_step_seconds(Recipe.parse("int8"))
        after = transformer(**inputs)[0]
    assert seconds > 0 and [row.part for row in speed.rows()] == ["int8(smooth=0.0)"]
    assert torch.equal(before, after) and not hasattr(transformer, "_cadence_quantization")
    measured = len(speed.forwards)
    pointed = Recipe.parse(f"int8(calibration={made_for_another_model})")
    assert speed.is_measured(pointed) and speed.per_step_seconds(pointed) == seconds
    assert len(speed.forwards) == measured  # the same calibration-free part: read from the cache


def test_the_calibration_free_form_clears_pointers_and_knobs_that_need_a_calibration():
    free = realsize.calibration_free
    static = Recipe.parse("fp8(activations=static, smooth=0.3, calibration=/x.json, checkpoint=/y)").techniques[0]
    assert str(free(static)) == "fp8"
    assert str(free(Recipe.parse("nvfp4(smooth=0.5, rank=16)").techniques[0])) == "nvfp4(rank=16)"
    assert str(free(Recipe.parse("mixed(sensitivity=/s.json, memory=0.5)").techniques[0])) == "mixed(memory=0.5)"
    untouched = Recipe.parse(MATH).techniques[0]
    assert free(untouched) == untouched
    assert realsize.per_forward_part(Recipe.parse("fixed-interval(budget=0.4) + int8")) == Recipe.parse(
        "int8(smooth=0)"
    )


def test_a_part_with_no_calibration_free_form_is_refused_naming_its_calibration(speed):
    with pytest.raises(
        ValueError,
        match=r"mixed needs its sensitivity calibration, which is made for the tuned model only, and has no "
        r"calibration-free form to time at tiny-wan-real \(calibration-free forms: smooth=0\.0, "
        r"activations='dynamic'\)",
    ):
        speed.per_step_seconds(Recipe.parse("mixed"))
    assert speed.rows() == [] and not hasattr(speed.pipe.transformer, "_cadence_quantization")


def test_building_the_real_size_leaves_the_callers_random_stream_untouched():
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    first = TINY.build("cpu")
    assert torch.equal(torch.random.get_rng_state(), state)
    second = TINY.build("cpu")  # the same weights every time, all the same
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))


def test_a_new_part_whose_measure_would_overrun_the_budget_is_rejected_as_out_of_time(tmp_path, monkeypatch):
    """The baseline's measure took 400 s (warm-up and timed steps): after the reserve (one
    more such measure) less than that is left of the 600-s budget, so the candidate's new
    part is not measured and the candidate is rejected with the out-of-time wording (which a
    resumed study tries again)."""
    measured = []

    def measure(self, part, key):
        measured.append(key)
        return realsize.PartTime(key, {"": 1.0, MATH: 0.5}[key], 400.0 - realsize.SPEED_STEPS)

    monkeypatch.setattr(realsize.SpeedAt, "_measure", measure)
    trial = _first_trial_of_a_refused_study(tmp_path)
    assert trial.state == optuna.trial.TrialState.PRUNED and measured == [""]
    assert trial.user_attrs["rejected"].startswith(
        f"{search_module.OUT_OF_TIME}: measuring its per-forward part at {TINY.name} takes about 400.0 s, "
    )
    assert "constraints" not in trial.user_attrs  # rejected before any case ran


def test_the_reserve_and_a_later_confirmation_round_count_the_parts_still_to_measure(speed, monkeypatch):
    monkeypatch.setattr(
        realsize.SpeedAt,
        "_measure",
        lambda self, part, key: realsize.PartTime(key, 1.0, 95.0),
    )
    speed.per_step_seconds(Recipe())  # one measure: 95 s warm-up + 5 steps of 1 s
    run = object.__new__(search_module._Run)
    run.speed, run.space, run.resumed = speed, types.SimpleNamespace(late=()), False
    assert run.speed_reserve() == 100.0  # the shipped default's part
    run.resumed = True  # the candidates' own parts were measured by an earlier run
    assert run.speed_reserve() == 100.0 * (1 + search_module.CONFIRMED_AT_ONCE)
    new = [
        Recipe.parse(MATH),
        Recipe.parse(f"fixed-interval(budget=0.4) + {MATH}"),  # the same part
        Recipe.parse("fixed-interval(budget=0.4)"),  # the baseline's part, measured
    ]
    assert run.new_measures_seconds(new) == 100.0
    speed.per_step_seconds(Recipe.parse(MATH))
    assert run.new_measures_seconds(new) == 0.0


def _run_for(speed, left: float, steps: int = 10) -> search_module._Run:
    """A search run reduced to what its real-size rules read: ``left`` seconds after the reserve."""
    run = object.__new__(search_module._Run)
    run.speed, run.space, run.resumed = speed, types.SimpleNamespace(late=()), False
    run.settings = types.SimpleNamespace(speed_at=TINY.name, steps=steps)
    run.cost = search_module.CostModel()
    run.remaining, run.reserve = (lambda: left), (lambda: 0.0)
    return run


def test_a_new_part_is_admitted_by_the_median_measure_not_the_longest(speed, monkeypatch):
    """Issue 22: one 42-s FP4 measure among 14-s ones refused every later part. The admission
    and the reserve count the median measure: one long measure moves neither."""
    seconds = {"": 10.0, "a": 10.0, "fp4": 400.0}  # warm-up; plus SPEED_STEPS steps of 1 s
    monkeypatch.setattr(realsize.SpeedAt, "_measure", lambda self, part, key: realsize.PartTime(key, 1.0, seconds[key]))
    for key in seconds:
        speed.measured[key] = speed._measure(Recipe(), key)
    assert speed.typical_measure() == 10.0 + realsize.SPEED_STEPS
    run = _run_for(speed, left=20.0)
    assert run.speed_reserve() == 15.0 and run.new_measures_seconds([Recipe.parse(MATH)]) == 15.0
    trial = optuna.trial.FixedTrial({})
    run.real_size_measure_fits(trial, Recipe.parse(MATH))  # 15 s fit in the 20 s left: not rejected
    assert "rejected" not in trial.user_attrs
    with pytest.raises(optuna.TrialPruned):
        _run_for(speed, left=14.0).real_size_measure_fits(trial, Recipe.parse(MATH))
    assert trial.user_attrs["rejected"].startswith(f"{search_module.OUT_OF_TIME}: measuring its per-forward part")


def test_a_measure_running_past_its_deadline_is_stopped_and_gives_back_the_model(speed):
    transformer = speed.pipe.transformer
    inputs = _forward_inputs()
    with torch.no_grad():
        before = transformer(**inputs)[0]
        forwards = len(speed.forwards)
        with pytest.raises(
            realsize.OutOfTime,
            match=rf"measuring {re.escape(MATH)} at {TINY.name} was stopped after [\d.]+ s, past the 0\.0 s the time "
            "budget left it",
        ):
            speed.per_step_seconds(Recipe.parse(MATH), deadline=0.0)
        stopped_at = len(speed.forwards) - forwards
        after = transformer(**inputs)[0]
    assert stopped_at == 1  # stopped at its first forward, not after the warm-up generation
    assert torch.equal(before, after) and len(transformer._forward_pre_hooks) == 1
    assert not speed.is_measured(Recipe.parse(MATH))  # asked again, it is measured again
    assert speed.per_step_seconds(Recipe.parse(MATH), deadline=600.0) > 0 and speed.is_measured(Recipe.parse(MATH))


def test_a_candidate_whose_measure_runs_out_of_time_is_rejected_as_out_of_time(speed):
    speed.per_step_seconds(Recipe())
    run = _run_for(speed, left=0.0)  # admitted (say), then nothing is left when its measure runs
    trial = optuna.trial.FixedTrial({})
    with pytest.raises(optuna.TrialPruned):
        run.per_forward_ratio(trial, Recipe.parse(f"fixed-interval(budget=0.5) + {MATH}"), {}, 1.0)
    # the out-of-time wording: a resumed study tries the candidate again (search._Run.repeat)
    assert trial.user_attrs["rejected"].startswith(f"{search_module.OUT_OF_TIME}: measuring {MATH} at {TINY.name}")
    assert not speed.is_measured(Recipe.parse(MATH))


def test_a_part_slower_than_the_baseline_rejects_its_step_policy_candidates_before_they_run(tmp_path, monkeypatch):
    """MATH at 3x the baseline's per-step time: with fixed-interval at 0.9 the candidate takes at
    least 3 x (0.9 - 1/10) = 2.4x, rejected once its part is measured, before a case runs; the
    next candidate with the same part at 0.5 (at least 1.2x) is rejected before anything runs:
    no measure, no warm-up, no calibration."""
    measured, warmed, runs = [], [], []

    def measure(self, part, key):
        measured.append(key)
        return realsize.PartTime(key, {"": 1.0, MATH: 3.0}[key], 0.0)

    from cadence.tune import evaluate as evaluate_module

    original_run, original_warm_up = evaluate_module.Evaluator.run, evaluate_module.Evaluator.warm_up
    monkeypatch.setattr(realsize.SpeedAt, "_measure", measure)
    monkeypatch.setattr(
        evaluate_module.Evaluator,
        "run",
        lambda self, recipe, case, deadline=None: (
            runs.append(str(recipe)) or original_run(self, recipe, case, deadline)
        ),
    )
    monkeypatch.setattr(
        evaluate_module.Evaluator,
        "warm_up",
        lambda self, recipe, case: warmed.append(str(recipe)) or original_warm_up(self, recipe, case),
    )
    asked = settings(tmp_path, speed_at=TINY.name, steps=10, trials=2)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=storage, study_name=STUDY)
    study.set_user_attr("settings", asked.identity())
    space = SearchSpace.from_registry(include=asked.include)
    for budget in (0.9, 0.5):
        study.enqueue_trial(space.params_of(Recipe.parse(f"fixed-interval(budget={budget}) + {MATH}")))
    with pytest.raises(TuneRefused):
        tune(tiny_wan_pipeline(), asked)
    first, second = optuna.load_study(study_name=STUDY, storage=storage).trials
    assert measured == ["", MATH] and runs == []
    assert warmed.count(f"fixed-interval(budget=0.9) + {MATH}") == 1  # the first, before its part was measured
    assert not any("budget=0.5" in recipe for recipe in warmed)
    assert first.user_attrs["rejected"] == (
        f"time: modelled at {TINY.name} at least 2.40x the baseline's (its per-forward part 3.00x, its step policy "
        "computing at least 0.80 of the block work), the time to beat is 1.00x"
    )
    assert second.state == optuna.trial.TrialState.PRUNED and "at least 1.20x" in second.user_attrs["rejected"]
    assert "relative_time" not in second.user_attrs  # a bound, not a modelled time


STEP_POLICIES = sorted(
    name
    for name, technique in load_builtin().items()
    if technique.config.level == realsize.STEP_LEVEL and not is_peer(technique.config)
)


@pytest.mark.parametrize("cfg_reuse", [False, True])
def test_no_step_policy_computes_less_than_its_least_share(cfg_reuse):
    """search.least_share is a bound the rejection relies on: every step policy that runs on
    the tiny Wan without a calibration (the calibrated ones run on the same engine) computes
    at least that share of the block work, with and without cfg_reuse (first-blocks at 0.6
    with cfg_reuse computes 0.4 there: a bound of the budget less one step would fail)."""
    from cadence import generation
    from cadence.recipe import accelerate

    pipe = tiny_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    size = generation.resolve_size(pipe, WAN_SIZE["height"], WAN_SIZE["width"], WAN_SIZE["frames"])
    checked = []
    for name in STEP_POLICIES:
        for budget in (0.6,):  # first-blocks' head block is half the tiny Wan's two: its least budget is 0.5
            try:
                recipe = Recipe([load_builtin()[name].config.from_params({"budget": budget, "cfg_reuse": cfg_reuse})])
                with accelerate(pipe, recipe) as acceleration:
                    generation.generate(pipe, PROMPTS[0], steps=10, seed=0, guidance_scale=4.0, size=size)
                    share = acceleration.stats()["compute_fraction"]
            except ValueError as error:  # a calibration it needs, a budget below its head blocks, cfg_reuse refused
                assert "calibration" in str(error) or "budget" in str(error) or "cfg_reuse" in str(error)
                continue
            assert share >= search_module.least_share(recipe, 10) - 1e-9, (str(recipe), share)
            checked.append(name)
    assert {"fixed-interval", "taylorseer", "first-blocks"} <= set(checked)


def test_a_measure_of_the_confirmation_stops_where_the_checks_time_begins(speed):
    """The confirmation's and the check's new measures are bounded too: stopped where the
    budget ends, less what the confirmation keeps for the check (at least 1 s, as a case's
    deadline); a stopped one fails its recipe alone (``check.compare`` catches it as it
    catches a part that cannot run)."""
    run = _run_for(speed, left=0.0)
    run.remaining = lambda: 100.0
    run.late_warm_up, run.baseline_seconds = 3.0, 2.0
    run.split = types.SimpleNamespace(check_cases=[("a", 0), ("b", 0)])
    assert run.check_reserve() == 2.0 * 2 * 2 + 3.0 * 2  # per check case the baseline and two recipes
    deadlines = []
    run.speed = types.SimpleNamespace(relative_time=lambda recipe, share, deadline: deadlines.append(deadline) or share)
    assert run.modelled(keep=10.0)(Recipe.parse(MATH), 0.5) == 0.5
    run.modelled(keep=200.0)(Recipe.parse(MATH), 0.5)
    assert deadlines == [90.0, 1.0]
    assert issubclass(realsize.OutOfTime, search_module.FAILURES)
