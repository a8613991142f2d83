"""cadence distill --method consistency on the tiny reference pipelines: a resumed run is the
uninterrupted one bit for bit (the EMA target included), the consistency loss falls on a fixed
batch, the consistency function meets its boundary f(x, 0) = x exactly, the student's Euler step is
deterministic multistep consistency sampling, the target starts as the student and trails it by
the EMA, bad settings are refused by name, and the card says the method and its settings."""

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_pipe
from distill.test_distill import SIZES, conditions, new_run, run, teacher_folder  # the DMD tests' tiny runs
from safetensors.torch import load_file

import cadence
from cadence.distill import DistillSettings, consistency, report, state
from cadence.distill.cli import distill as distill_command
from cadence.distill.student import Denoiser, euler, student_scheduler, student_sigmas


def consistency_run(kind: str, out, **changes) -> dict:
    return run(kind, out, **({"method": "consistency", "ode_steps": 1} | changes))


@pytest.mark.parametrize("kind", ["video", "image"])
def test_interrupted_consistency_run_resumed_is_the_uninterrupted_run_bit_for_bit(tmp_path, kind):
    whole = consistency_run(kind, tmp_path / "whole", max_steps=3)
    consistency_run(kind, tmp_path / "parts", max_steps=2)  # stops after the first consistency step
    resumed = consistency_run(kind, tmp_path / "parts", max_steps=3)
    assert resumed["steps_trained"] == whole["steps_trained"] == 3
    a = load_file(str(state.tensors_path(tmp_path / "whole")))
    b = load_file(str(state.tensors_path(tmp_path / "parts")))
    assert a.keys() == b.keys()
    assert any(key.startswith("target.") for key in a) and not any(key.startswith("critic.") for key in a)
    assert not [key for key in a if not torch.equal(a[key], b[key])]
    history = [
        json.loads((tmp_path / name / "state" / "state.json").read_text())["history"] for name in ("whole", "parts")
    ]
    assert history[0] == history[1]
    assert [h["phase"] for h in history[0]] == ["ode", "consistency", "consistency"]
    # Not a comparison of untouched copies: the student moved, and the target trails it without being it.
    teacher = tiny_pipe(kind).transformer.state_dict()
    assert any(not torch.equal(a[f"student.{k}"], v.float()) for k, v in teacher.items())
    assert any(not torch.equal(a[f"student.{k}"], a[f"target.{k}"]) for k in teacher)


def test_consistency_loss_falls_on_a_fixed_batch(tmp_path):
    kind = "video"
    pipe = tiny_pipe(kind)
    run_ = new_run(pipe, tmp_path, method="consistency", ode_steps=0, ode_pairs=2, batch_size=2, lr=1e-2)
    pairs = run_._pairs()
    x0 = pairs["x0"]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    grid_index = torch.tensor([0, 3])  # the 4-interval teacher grid's first (s = 1) and last (reaching s = 0)
    condition = run_.conditions.batch(pairs["condition"], "cpu")
    losses = []
    for run_.step in range(6):
        run_._learning_rates()
        losses.append(run_.consistency_update(x0, noise, grid_index, condition)["consistency"])
    assert losses[-1] < 0.85 * losses[0], losses


@pytest.mark.parametrize("kind", ["video", "image"])
def test_the_consistency_function_is_x_at_sigma_zero_and_a_pair_reaching_zero_targets_the_teachers_step(kind):
    pipe = tiny_pipe(kind)
    denoiser, c = Denoiser(pipe, SIZES[kind]), conditions(kind)
    model = pipe.transformer.float()
    condition, empty = c.batch(torch.arange(2), "cpu"), c.empty(2, "cpu")
    x = denoiser.noise(2, torch.Generator().manual_seed(0), "cpu")
    zero = torch.zeros(2)
    assert torch.equal(consistency.consistency_function(denoiser, model, x, zero, condition), x)
    assert not torch.equal(consistency.consistency_function(denoiser, model, x, torch.full((2,), 0.5), condition), x)
    # The last interval's pair: its target is the teacher's CFG Euler step to 0 itself, whatever the target net.
    grid = [1.0, 0.75, 0.5, 0.25, 0.0]
    sigma, sigma_next = consistency.pair_sigmas(grid, torch.tensor([3, 2]), skip=2)
    assert sigma.tolist() == [0.25, 0.5] and sigma_next.tolist() == [0.0, 0.0]  # clamped at the grid's end
    target = tiny_pipe(kind).transformer.float()
    with torch.no_grad():
        for p in target.parameters():
            p.add_(1.0)
    wanted = consistency.teacher_target(denoiser, model, target, x, sigma, sigma_next, condition, empty, 4.0)
    step = x - sigma.view(-1, *[1] * (x.dim() - 1)) * denoiser.guided_velocity(model, x, sigma, condition, empty, 4.0)
    assert torch.equal(wanted, step)


@pytest.mark.parametrize("kind", ["video", "image"])
def test_the_students_euler_sampler_is_multistep_consistency_sampling(kind):
    pipe = tiny_pipe(kind)
    denoiser, c = Denoiser(pipe, SIZES[kind]), conditions(kind)
    model = pipe.transformer.float()
    sigmas = student_sigmas(pipe.scheduler, 3)
    noise = denoiser.noise(2, torch.Generator().manual_seed(0), "cpu")
    condition = c.batch(torch.arange(2), "cpu")
    with torch.no_grad():
        by_euler, _ = euler(denoiser, model, noise, [*sigmas, 0.0], condition)
    by_consistency = consistency.multistep_sample(denoiser, model, noise, sigmas, condition)
    assert torch.allclose(by_euler, by_consistency, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(by_euler, noise, atol=1e-2)  # the chain moved: the comparison is not of two copies

    # The scheduler the shipped pipeline steps with computes the same formula at each student sigma.
    scheduler = student_scheduler(pipe.scheduler)
    scheduler.set_timesteps(sigmas=sigmas)
    x, velocity = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1)).unbind(0)
    ends = [*sigmas, 0.0]
    for k, t in enumerate(scheduler.timesteps):
        s, after = torch.tensor([ends[k]]), ends[k + 1]
        formula = (1 - after) * (x - ends[k] * velocity) + after * consistency.implied_noise(x, s, velocity)
        stepped = scheduler.step(velocity, t, x, return_dict=False)[0]
        assert torch.allclose(stepped, formula, atol=1e-6), k


def test_the_target_starts_as_the_student_and_trails_it_by_the_ema(tmp_path):
    kind = "video"
    pipe = tiny_pipe(kind)
    run_ = new_run(pipe, tmp_path, method="consistency", ode_steps=1, ema_decay=0.9)
    with torch.no_grad():
        for p in run_.student.parameters():  # as after the ODE phase: the student is no longer the teacher
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    run_.step = 1  # the first consistency step
    run_._learning_rates()
    before = {k: v.clone() for k, v in run_.student.state_dict().items()}
    run_.consistency_step()
    after = run_.student.state_dict()
    target = run_.target.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(target[k], before[k].lerp(after[k], 1 - 0.9)) for k in before)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"ema_decay": 0.0}, "ema_decay=0.0 must be in (0, 1): 0 < ema_decay < 1"),
        ({"ema_decay": 1.0}, "ema_decay=1.0 must be in (0, 1): 0 < ema_decay < 1"),
        ({"ema_decay": -0.5}, "ema_decay=-0.5 must be in (0, 1): 0 < ema_decay < 1"),
        ({"skip": 0}, "skip=0 must be an integer >= 1"),
        ({"skip": 1.5}, "skip=1.5 must be an integer >= 1"),
        (
            {"steps": 2, "teacher_steps": 4, "skip": 5},
            "skip=5 is more than the teacher grid's 4 intervals (2 steps x 2 teacher steps each); valid: 1 to 4",
        ),
        ({"method": "lcm"}, "method='lcm' is unknown; valid: dmd, consistency"),
    ],
)
def test_bad_consistency_settings_are_refused_by_name(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DistillSettings(**({"method": "consistency"} | changes))


def test_each_methods_identity_holds_only_the_settings_it_reads():
    dmd, cd = DistillSettings(), DistillSettings(method="consistency")
    dmd_keys, cd_keys = dmd.identity().keys(), cd.identity().keys()
    assert {"critic_updates", "critic_lr"} <= dmd_keys and not {"ema_decay", "skip"} & dmd_keys
    assert {"ema_decay", "skip"} <= cd_keys and not {"critic_updates", "critic_lr"} & cd_keys
    assert DistillSettings(skip=2).identity() == dmd.identity()  # a DMD run resumes whatever consistency's knobs say


def test_cli_refuses_a_bad_ema_decay_before_loading_the_teacher(tmp_path):
    options = ["--teacher", "ref-video", "--out", str(tmp_path / "o"), "--method", "consistency", "--ema-decay", "1.5"]
    result = CliRunner().invoke(distill_command, options)
    assert result.exit_code != 0 and "ema_decay=1.5 must be in (0, 1)" in result.output
    assert not (tmp_path / "o").exists()


def test_cli_consistency_student_loads_and_its_card_says_the_method(tmp_path):
    teacher, embeddings = teacher_folder(tmp_path)
    options = ["--teacher", str(teacher), "--out", str(tmp_path / "student"), "--embeddings", str(embeddings)]
    options += ["--method", "consistency", "--ema-decay", "0.9", "--skip", "2", "--steps", "2", "--max-steps", "2"]
    options += ["--ode-steps", "0", "--ode-pairs", "2", "--teacher-steps", "4", "--batch-size", "2"]
    options += ["--eval-every", "0", "--sample-steps", "2", "--device", "cpu"]
    result = CliRunner().invoke(distill_command, options)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "student" / "student.json").read_text())
    assert record["method"] == "consistency" and record["settings"]["ema_decay"] == 0.9
    assert record["settings"]["skip"] == 2
    card = (tmp_path / "student" / "README.md").read_text()
    assert "(consistency)" in card.splitlines()[0]
    assert "- Method: `consistency`, consistency distillation" in card
    assert "EMA target decay 0.9, pairs 2 teacher grid interval(s) apart, pseudo-Huber distance" in card
    pipe = cadence.load(str(tmp_path / "student"), text_encoder=False)
    assert pipe.student["steps"] == 2 and pipe.sampling_defaults(None, None) == (2, 1.0)
    # The DMD card names its own method and settings on the same line.
    dmd = dataclasses.asdict(DistillSettings(critic_updates=3))
    assert report.method_line(dmd).startswith("DMD2 (critic from the teacher, 3 critic updates per generator step")
