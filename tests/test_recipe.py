"""A recipe's three forms (objects, CLI string, TOML) round-trip, bad recipes are refused
with a message naming the bad value and the valid ones, and ``accelerate`` gives back the
exact model when its ``Acceleration`` is closed."""

import dataclasses
import re
import types

import pytest
import torch

import cadence
from cadence.accel.cache.fixed_interval import FixedIntervalConfig
from cadence.accel.registry import TechniqueConfig, get_technique, load_builtin
from cadence.recipe import Recipe

TECHNIQUE_NAMES = sorted(load_builtin())


# -- round trips ----------------------------------------------------------------------

@pytest.mark.parametrize("recipe", [
    Recipe(),
    Recipe([FixedIntervalConfig()]),
    Recipe([FixedIntervalConfig(interval=3, warmup=2)]),
    Recipe([FixedIntervalConfig(interval=5, warmup=0, cooldown=4)]),
], ids=str)
def test_objects_round_trip_through_the_string_and_through_toml(recipe):
    assert Recipe.parse(str(recipe)) == recipe
    assert Recipe.from_toml(recipe.to_toml()) == recipe


@pytest.mark.parametrize("text", [
    "baseline",
    "fixed-interval",
    "fixed-interval(interval=3, warmup=2)",
    "fixed-interval(interval=4, cooldown=3, warmup=0)",
])
def test_canonical_string_survives_toml(text):
    assert str(Recipe.parse(text)) == text
    assert str(Recipe.from_toml(Recipe.parse(text).to_toml())) == text


def test_string_with_spacing_and_quoted_values_reads_as_the_same_recipe():
    expected = Recipe([FixedIntervalConfig(interval=3, warmup=2)])
    assert Recipe.parse("  fixed-interval ( interval = 3 , warmup='2' ) ") == expected


def test_toml_file_path_parses_like_its_text(tmp_path):
    recipe = Recipe([FixedIntervalConfig(interval=3, warmup=2)])
    path = tmp_path / "fast.toml"
    path.write_text(recipe.to_toml())
    assert Recipe.parse(str(path)) == recipe


def test_toml_written_by_hand_reads_into_configs():
    text = '[[technique]]\nname = "fixed-interval"\ninterval = 3\nwarmup = 2\n'
    assert Recipe.from_toml(text) == Recipe([FixedIntervalConfig(interval=3, warmup=2)])


@pytest.mark.parametrize("name", TECHNIQUE_NAMES)
def test_defaults_only_config_prints_as_its_name_and_parses_back(name):
    config = get_technique(name).config()
    assert str(config) == name
    assert Recipe.parse(name) == Recipe([config])


def test_only_changed_parameters_are_printed():
    assert str(FixedIntervalConfig(interval=3)) == "fixed-interval(interval=3)"


@pytest.mark.parametrize("text", ["baseline", "none", " baseline "])
def test_baseline_spellings_are_the_empty_recipe(text):
    recipe = Recipe.parse(text)
    assert recipe == Recipe()
    assert not recipe
    assert str(recipe) == "baseline"


# -- refusals -------------------------------------------------------------------------

def _refused(text: str, *fragments: str) -> str:
    with pytest.raises(ValueError) as error:
        Recipe.parse(text)
    message = str(error.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from {message!r}"
    return message


def test_unknown_technique_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown technique 'nope'.*fixed-interval"):
        Recipe.parse("nope")
    message = _refused("fixed-interval + nope", "'nope'")
    assert all(name in message for name in TECHNIQUE_NAMES)


def test_technique_names_are_case_sensitive():
    _refused("Fixed-Interval", "'Fixed-Interval'", "fixed-interval")


def test_unknown_parameter_lists_valid_parameters():
    with pytest.raises(ValueError, match=r"unknown parameter 'intervl'.*fixed-interval"):
        Recipe.parse("fixed-interval(intervl=3)")
    _refused("fixed-interval(intervl=3)", "interval", "warmup", "cooldown")


@pytest.mark.parametrize("text, bad", [
    ("fixed-interval(interval=abc)", "interval='abc'"),
    ("fixed-interval(interval=2.5)", "interval=2.5"),
    ("fixed-interval(interval=true)", "interval=True"),
])
def test_wrong_type_names_the_value_and_the_expected_type(text, bad):
    with pytest.raises(ValueError, match=re.escape(bad) + r".*must be of type int"):
        Recipe.parse(text)


@pytest.mark.parametrize("text, bad, valid", [
    ("fixed-interval(interval=0)", "interval=0", ">= 1"),
    ("fixed-interval(interval=-3)", "interval=-3", ">= 1"),
    ("fixed-interval(warmup=-1)", "warmup=-1", ">= 0"),
    ("fixed-interval(cooldown=-2)", "cooldown=-2", ">= 0"),
])
def test_out_of_range_names_the_value_and_the_valid_range(text, bad, valid):
    with pytest.raises(ValueError, match=re.escape(bad) + r".*" + re.escape(valid)):
        Recipe.parse(text)


def test_out_of_range_is_refused_in_python_too():
    with pytest.raises(ValueError, match=r"interval=0 must be >= 1"):
        FixedIntervalConfig(interval=0)


@pytest.mark.parametrize("text, bad, valid", [
    ("fixed-interval(interval)", "'interval'", "key=value"),
    ("fixed-interval(", "'fixed-interval('", "name(key=value"),
    ("fixed-interval + ", "''", "name(key=value"),
    ("fixed interval", "'fixed interval'", "name(key=value"),
])
def test_malformed_terms_name_the_term_and_the_expected_form(text, bad, valid):
    with pytest.raises(ValueError, match=re.escape(bad) + r".*" + re.escape(valid)):
        Recipe.parse(text)


@pytest.mark.parametrize("text", ["", "   "])
def test_an_empty_string_is_refused_not_taken_for_the_baseline(text):
    _refused(text, f"recipe {text!r} is empty", "'baseline'")


@pytest.mark.parametrize("text, where", [
    ("fixed-interval(interval=2))", "stray ')' at character 27"),
    ("fixed-interval(interval=2) + magcache)", "stray ')' at character 38"),
    ("fixed-interval(interval=2", "'(' is never closed"),
    ("sparse-window(backend='flex)", "the quote ' is never closed"),
])
def test_unbalanced_brackets_are_named_not_reported_as_a_bad_value(text, where):
    message = _refused(text, repr(text), where, "name(key=value, ...)")
    assert "must be of type" not in message


def test_missing_toml_file_is_named(tmp_path):
    path = tmp_path / "missing.toml"
    with pytest.raises(ValueError, match=re.escape(repr(str(path))) + r" does not exist"):
        Recipe.parse(str(path))


def test_toml_that_does_not_parse_says_so():
    with pytest.raises(ValueError, match=r"recipe TOML does not parse.*line 2"):
        Recipe.from_toml('[[technique]]\nname = "fixed-interval\n')


def test_toml_file_that_does_not_parse_says_so(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("[[technique\n")
    with pytest.raises(ValueError, match=r"recipe TOML does not parse"):
        Recipe.parse(str(path))


def test_unknown_toml_key_is_named_with_the_valid_layout():
    with pytest.raises(ValueError, match=r"unknown recipe TOML key.*'techniques'.*\[\[technique\]\]"):
        Recipe.from_toml('[[techniques]]\nname = "fixed-interval"\n')


def test_technique_table_without_name_is_refused():
    with pytest.raises(ValueError, match=r"\[\[technique\]\] table needs a name.*'interval': 3"):
        Recipe.from_toml("[[technique]]\ninterval = 3\n")


def test_toml_values_are_validated_like_string_values():
    with pytest.raises(ValueError, match=r"interval=0 must be >= 1"):
        Recipe.from_toml('[[technique]]\nname = "fixed-interval"\ninterval = 0\n')
    with pytest.raises(ValueError, match=r"unknown parameter 'speed'.*valid: interval, cooldown, warmup, budget, cfg_reuse"):
        Recipe.from_toml('[[technique]]\nname = "fixed-interval"\nspeed = 3\n')


@pytest.mark.parametrize("text", ['[technique]\nname = "fixed-interval"\n', "technique = [1]\n"],
                         ids=["single table", "list of non-tables"])
def test_technique_that_is_not_a_list_of_tables_is_refused_with_the_layout(text):
    with pytest.raises(ValueError, match=r"\[\[technique\]\]"):
        Recipe.from_toml(text)


def test_two_step_level_policies_are_refused():
    with pytest.raises(ValueError, match=r"one step-reuse policy, got 2: fixed-interval, fixed-interval"):
        Recipe.parse("fixed-interval + fixed-interval(interval=3)")
    with pytest.raises(ValueError, match=r"one step-reuse policy"):
        Recipe([FixedIntervalConfig(), FixedIntervalConfig(interval=3)])
    with pytest.raises(ValueError, match=r"one attention technique, got 2: sparse-window, attention-backend"):
        Recipe.parse("sparse-window + attention-backend")
    with pytest.raises(ValueError, match=r"one quantization technique, got 2: fp8, weight-int4; .* use mixed"):
        Recipe.parse("fp8 + weight-int4")
    assert len(Recipe.parse("magcache + sparse-window + fp8").techniques) == 3  # one per level composes


def test_recipe_holds_only_technique_configs():
    with pytest.raises(TypeError, match=r"technique configs, got str"):
        Recipe(["fixed-interval"])


# -- accelerate -----------------------------------------------------------------------

def _forwards(model, timesteps=(1000.0, 750.0, 500.0, 250.0)) -> list[torch.Tensor]:
    """One transformer forward per denoising step of a tiny clip, seeded."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, model.config.in_channels, 2, 8, 8, generator=generator)  # (B, C, frames, H, W)
    text = torch.randn(1, 5, model.config.text_dim, generator=generator)  # (B, tokens, dim)
    with torch.no_grad():
        return [model(hidden_states=hidden, timestep=torch.tensor([t]), encoder_hidden_states=text,
                      return_dict=False)[0] for t in timesteps]


@pytest.mark.parametrize("target", [object(), "ref-video", None, torch.zeros(2)],
                         ids=["object", "model-name", "None", "tensor"])
def test_accelerate_refuses_what_is_not_a_model_or_pipeline(target):
    with pytest.raises(TypeError, match=r"cannot find a transformer in \w+: pass a diffusers pipeline"):
        cadence.accelerate(target, "fixed-interval")


def test_accelerate_applies_a_recipe_string(make_model):
    model = make_model["wan"]()
    with cadence.accelerate(model, "fixed-interval(interval=2)") as acceleration:
        assert acceleration.recipe == Recipe([FixedIntervalConfig(interval=2)])
        assert cadence.get_context(model) is not None
        _forwards(model)
        stats = acceleration.stats()
    # warmup 1, interval 2 over 4 steps: steps 0, 1, 3 computed, step 2 reused.
    assert stats["forwards"] == 4
    assert stats["compute_fraction"] == FixedIntervalConfig(interval=2).expected_fraction(4) == 0.75


def test_accelerate_reaches_a_pipeline_transformer(make_model):
    model = make_model["wan"]()
    pipeline = types.SimpleNamespace(transformer=model)
    acceleration = cadence.accelerate(pipeline, "fixed-interval")
    assert cadence.get_context(model) is not None
    acceleration.remove()
    assert cadence.get_context(model) is None


def test_context_manager_gives_back_the_exact_model(make_model):
    model = make_model["wan"]()
    baseline = _forwards(model)
    with cadence.accelerate(model, "fixed-interval(interval=2)"):
        accelerated = _forwards(model)
    assert not torch.equal(accelerated[2], baseline[2])  # step 2 was reused: the recipe did act
    assert cadence.get_context(model) is None
    for after, before in zip(_forwards(model), baseline):
        assert torch.equal(after, before)


def test_context_manager_removes_hooks_when_the_body_raises(make_model):
    model = make_model["wan"]()
    baseline = _forwards(model)
    with pytest.raises(RuntimeError, match="boom"):
        with cadence.accelerate(model, "fixed-interval(interval=2)"):
            assert cadence.get_context(model) is not None
            raise RuntimeError("boom")
    assert cadence.get_context(model) is None
    for after, before in zip(_forwards(model), baseline):
        assert torch.equal(after, before)


def test_refused_recipe_leaves_the_model_untouched(make_model):
    model = make_model["wan"]()
    with pytest.raises(ValueError, match="unknown technique 'nope'"):
        cadence.accelerate(model, "nope")
    assert cadence.get_context(model) is None


# -- configs are values ---------------------------------------------------------------

def test_config_is_frozen():
    config = FixedIntervalConfig(interval=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.interval = 4
    assert config.interval == 3


def test_configs_compare_and_hash_by_value():
    assert FixedIntervalConfig(interval=3, warmup=2) == FixedIntervalConfig(interval=3, warmup=2)
    assert FixedIntervalConfig(interval=3) != FixedIntervalConfig(interval=4)
    assert FixedIntervalConfig() == FixedIntervalConfig(interval=2, warmup=1, cooldown=0)
    assert len({FixedIntervalConfig(interval=3), FixedIntervalConfig(interval=3)}) == 1


@pytest.mark.parametrize("name", TECHNIQUE_NAMES)
def test_describe_lists_every_parameter_with_its_default(name):
    config_class = get_technique(name).config
    assert issubclass(config_class, TechniqueConfig)
    described = {param: default for param, _, default, _ in config_class.describe()}
    assert described == config_class().params()
    assert all(help_text for *_, help_text in config_class.describe())


def test_fixed_interval_describes_its_own_parameters_then_the_shared_ones():
    described = [(param, kind) for param, kind, _, _ in FixedIntervalConfig.describe()]
    assert described == [("interval", "int"), ("cooldown", "int"), ("warmup", "int"), ("budget", "float"),
                         ("cfg_reuse", "bool")]


def test_spelled_out_names_every_parameter_defaults_included():
    recipe = Recipe.parse("fixed-interval + sparse-window(density=0.5)")
    assert str(recipe) == "fixed-interval + sparse-window(density=0.5)"
    spelled = recipe.spelled_out()
    assert spelled.startswith("fixed-interval(interval=2, cooldown=0, warmup=1, budget=0.0")
    for config in recipe.techniques:
        for name in config.params():
            assert f"{name}=" in spelled
    assert Recipe.parse(spelled) == recipe  # and it parses back to the same recipe
    assert Recipe().spelled_out() == "baseline"


@pytest.mark.parametrize("recipe", [42, 2.5, object()], ids=["int", "float", "object"])
def test_accelerate_refuses_what_is_not_a_recipe_naming_what_is(make_model, recipe):
    with pytest.raises(TypeError, match=rf"a recipe is a Recipe, a recipe string .*; got {type(recipe).__name__}"):
        cadence.accelerate(make_model["wan"](), recipe)


@pytest.mark.parametrize("first, second, message", [
    ("fixed-interval", "first-blocks", "the model already has a step-reuse policy, fixed-interval, from an "
                                       "earlier accelerate()"),
    ("sparse-window", "sparse-topk", "the model already has an attention technique, sparse-window"),
    ("weight-int8", "fp8", "the model is already quantized by weight-int8"),
    ("compile(backend='eager')", "diffusers-pab", "compile cannot hold diffusers-pab"),
])
def test_a_second_accelerate_at_a_level_the_first_holds_is_refused_like_the_recipe(make_model, first, second, message):
    model = make_model["wan"]()
    expected = _forwards(model)
    with cadence.accelerate(model, first):
        with pytest.raises(ValueError) as error:
            cadence.accelerate(model, second)
        assert message in str(error.value) and "one recipe" in str(error.value)
        with pytest.raises(ValueError, match="one |cannot hold"):
            Recipe.parse(f"{first} + {second}")  # the recipe refuses the same pair
    assert all(torch.equal(a, b) for a, b in zip(_forwards(model), expected, strict=True))
    with cadence.accelerate(model, second):  # once the first is removed, the second applies
        pass


def test_accelerations_at_different_levels_compose_across_calls(make_model):
    model = make_model["wan"]()
    with cadence.accelerate(model, "fixed-interval"), cadence.accelerate(model, "weight-int8"):
        assert [t.name for t in cadence.recipe.active_techniques(model)] == ["fixed-interval", "weight-int8"]
    assert cadence.recipe.active_techniques(model) == [] and not hasattr(model, cadence.recipe.ACTIVE)


@pytest.mark.parametrize("block, noted", [(128, True), (16, False)])
def test_a_sparse_pattern_with_too_few_tokens_for_its_blocks_says_so(block, noted):
    from conftest import tiny_pipe, tiny_sample

    pipe = tiny_pipe("video")  # 4 frames x 8 x 8, patch 2: 64 tokens
    with cadence.accelerate(pipe, f"sparse-window(density=0.25, block={block})") as acceleration:
        tiny_sample(pipe, "video", steps=5)
        notes = acceleration.notes()
    if noted:
        assert len(notes) == 1 and "density=0.25 was asked" in notes[0] and "128-token blocks" in notes[0]
    else:
        assert notes == [] and acceleration.stats()["density"] < 1
