"""cadence.distill on tiny reference pipelines (conftest's random Wan and FLUX): a resumed run is
the uninterrupted run bit for bit, the student checkpoint opens with cadence.load and runs K
forwards without CFG, DMD's gradient vanishes when the fake score is the real one, the
ODE-pair phase fits its pairs, and bad configuration is refused by name. Also: a kill between the
tensor file and the JSON leaves the previous state whole, resuming with other evaluation settings or
conditions is refused, the warm-up restarts at DMD, a generator step moves x0 toward the real x0, and
the student is judged through its shipped bf16 weights."""

import copy
import json

import pytest
import torch
from click.testing import CliRunner
from conftest import TEXT_DIM, TINY_DISTILL, kill_at_the_second_call, tiny_pipe
from safetensors.torch import load_file

import cadence
from cadence.distill import Conditions, DistillSettings, distill, dmd, ode_pairs, state
from cadence.distill.cli import distill as distill_command
from cadence.distill.student import Denoiser, student_sigmas
from cadence.distill.trainer import _Run

SIZES = {"video": {"frames": 2, "height": 8, "width": 8}, "image": {"height": 8, "width": 8}}


def conditions(kind: str, count: int = 6) -> Conditions:
    generator = torch.Generator().manual_seed(5)
    pooled = kind == "image"
    return Conditions(
        tokens=torch.randn(count, 5, TEXT_DIM, generator=generator),
        empty_tokens=torch.randn(1, 5, TEXT_DIM, generator=generator),
        pooled=torch.randn(count, TEXT_DIM, generator=generator) if pooled else None,
        empty_pooled=torch.randn(1, TEXT_DIM, generator=generator) if pooled else None,
    )


def settings(kind: str, **changes) -> DistillSettings:
    base = {
        "steps": 2,
        "batch_size": 2,
        "critic_updates": 2,
        "ode_steps": 2,
        "ode_pairs": 4,
        "teacher_steps": 4,
        "max_steps": 5,
        "seconds": 1e6,
        "eval_every": None,
        "save_every": 1e9,
        "sample_prompts": 1,
        "sample_steps": 2,
        "lr": 1e-3,
        "critic_lr": 1e-3,
        "size": SIZES[kind],
    }
    return DistillSettings(**(base | changes))


def new_run(pipe, tmp_path, **changes) -> _Run:
    """A training run of the tiny video ``pipe``, its steps driven by the test."""
    return _Run(pipe, Denoiser(pipe, SIZES["video"]), settings("video", **changes), conditions("video"), tmp_path,
                "cpu", "tiny")


def teacher_folder(tmp_path):
    """A tiny video teacher saved as a checkpoint folder, and an embeddings file of its conditions."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from safetensors.torch import save_file

    from cadence.reference.pipelines import RefVideoPipeline

    teacher = tmp_path / "teacher"
    RefVideoPipeline(
        transformer=tiny_pipe("video").transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        sample_size=SIZES["video"],
    ).save_pretrained(str(teacher))
    c = conditions("video")
    embeddings = tmp_path / "embeddings.safetensors"
    save_file({"train_tokens": c.tokens, "empty_tokens": c.empty_tokens}, str(embeddings))
    return teacher, embeddings


def run(kind: str, out, **changes) -> dict:
    return distill(
        tiny_pipe(kind), out, settings=settings(kind, **changes), conditions=conditions(kind), progress=False
    )


@pytest.mark.parametrize("kind", ["video", "image"])
def test_interrupted_run_resumed_is_the_uninterrupted_run_bit_for_bit(tmp_path, kind):
    whole = run(kind, tmp_path / "whole", max_steps=5)
    run(kind, tmp_path / "parts", max_steps=3)  # stops inside DMD (ODE pairs: steps 0-1)
    resumed = run(kind, tmp_path / "parts", max_steps=5)
    assert resumed["steps_trained"] == whole["steps_trained"] == 5
    a = load_file(str(state.tensors_path(tmp_path / "whole")))
    b = load_file(str(state.tensors_path(tmp_path / "parts")))
    assert a.keys() == b.keys()
    differing = [key for key in a if not torch.equal(a[key], b[key])]
    assert not differing
    history = [
        json.loads((tmp_path / name / "state" / "state.json").read_text())["history"] for name in ("whole", "parts")
    ]
    assert history[0] == history[1]
    assert [h["phase"] for h in history[0]] == ["ode", "ode", "dmd", "dmd", "dmd"]
    # The run changed the student: the comparison above is not of two untouched copies.
    teacher = tiny_pipe(kind).transformer.state_dict()
    assert any(not torch.equal(a[f"student.{k}"], v.float()) for k, v in teacher.items())


@pytest.mark.parametrize("kind", ["video", "image"])
def test_student_checkpoint_loads_and_runs_k_forwards_without_cfg(tmp_path, kind):
    summary = run(kind, tmp_path / "run", steps=3, max_steps=2)
    for name in ("student.json", "loss.png", "samples.png", "README.md", "model_index.json"):
        assert (tmp_path / "run" / name).is_file(), name
    record = json.loads((tmp_path / "run" / "student.json").read_text())
    assert record["steps"] == 3 and record["guidance_scale"] == 1.0 and record["steps_trained"] == 2
    assert record["sigmas"] == summary["sigmas"] == student_sigmas(tiny_pipe(kind).scheduler, 3)

    pipe = cadence.load(str(tmp_path / "run"), text_encoder=False)
    calls = []
    hook = pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, out: calls.append(kwargs["timestep"]), with_kwargs=True
    )
    c = conditions(kind)
    # Negative embeddings given: only the student's default guidance keeps the uncond branch off.
    arguments = dict(prompt_embeds=c.tokens[:1], negative_prompt_embeds=c.empty_tokens, **SIZES[kind])
    if kind == "image":
        arguments |= {"pooled_prompt_embeds": c.pooled[:1], "negative_pooled_prompt_embeds": c.empty_pooled}
    output = pipe(**arguments)
    hook.remove()
    assert len(calls) == 3  # K forwards: no CFG, no extra step
    scale = 1000 if kind == "video" else 1
    assert torch.allclose(torch.stack([t[0].float() for t in calls]), torch.tensor(record["sigmas"]) * scale)
    assert torch.isfinite(output[0]).all()
    assert pipe.transformer.dtype == torch.float32


@pytest.mark.parametrize("kind", ["video", "image"])
def test_dmd_gradient_is_zero_when_the_critic_is_the_real_score(kind):
    pipe = tiny_pipe(kind)
    denoiser, c = Denoiser(pipe, SIZES[kind]), conditions(kind)
    teacher = pipe.transformer.float().requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    sigmas = student_sigmas(pipe.scheduler, 2)
    condition, empty = c.batch(torch.arange(2), "cpu"), c.empty(2, "cpu")

    def gradients(critic):
        student.zero_grad(set_to_none=True)
        noise = denoiser.noise(2, torch.Generator().manual_seed(0), "cpu")
        x0 = dmd.student_sample(denoiser, student, noise, sigmas, 1, condition)  # backward simulation: step 1 of 2
        loss = dmd.generator_loss(
            denoiser, teacher, critic, x0, condition, empty, 1.0, torch.Generator().manual_seed(1)
        )
        loss.backward()
        return [p.grad for p in student.parameters() if p.grad is not None]

    same = gradients(copy.deepcopy(teacher))
    assert same and all(torch.count_nonzero(g) == 0 for g in same)
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    assert any(torch.count_nonzero(g) > 0 for g in gradients(other))  # a different critic does push


def test_ode_pair_phase_lowers_its_regression_loss_on_a_fixed_batch(tmp_path):
    kind = "video"
    pipe = tiny_pipe(kind)
    # the 12 steps below: all ODE phase
    run_ = new_run(pipe, tmp_path, ode_pairs=4, batch_size=4, lr=3e-3, ode_steps=12)
    pairs = run_._pairs()
    assert pairs["points"].shape[:2] == (2, 4)
    # Every pair at every student step: a fixed batch.
    steps = torch.arange(2).repeat_interleave(4)
    index = torch.arange(4).repeat(2)
    condition = run_.conditions.batch(pairs["condition"][index], "cpu")

    def loss():
        with torch.no_grad():
            return float(
                ode_pairs.regression_loss(
                    run_.denoiser,
                    run_.student,
                    pairs["points"][:, index],
                    pairs["x0"][index],
                    run_.sigmas,
                    steps,
                    condition,
                )
            )

    before = loss()
    for run_.step in range(12):
        run_._learning_rates()
        run_.ode_step()
    assert loss() < 0.8 * before


def test_ode_pairs_start_from_noise_and_end_at_the_teacher_sample():
    pipe = tiny_pipe("video")
    denoiser, c = Denoiser(pipe, SIZES["video"]), conditions("video")
    sigmas = student_sigmas(pipe.scheduler, 2)
    noise = denoiser.noise(2, torch.Generator().manual_seed(0), "cpu")
    condition, empty = c.batch(torch.arange(2), "cpu"), c.empty(2, "cpu")
    recorded = ode_pairs.record(denoiser, pipe.transformer, noise, sigmas, 8, condition, empty, 3.0)
    assert torch.equal(recorded["points"][0], noise)  # recorded at the student's first sigma: the noise itself
    from cadence.distill.student import euler, refined_grid

    grid, marks = refined_grid(sigmas, 4)
    assert [grid[m] for m in marks] == sigmas and grid[-1] == 0.0 and len(grid) == 9
    end, _ = euler(denoiser, pipe.transformer, recorded["points"][1], grid[marks[1] :], condition, empty, 3.0)
    assert torch.equal(end, recorded["x0"])


# -- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"steps": 0}, "steps=0 must be an integer >= 1"),
        ({"method": "gan"}, "method='gan' is unknown; valid: dmd, consistency"),
        ({"critic_updates": 0}, "critic_updates=0 must be an integer >= 1"),
        ({"guidance_scale": 0.5}, "guidance_scale=0.5 must be >= 1"),
        ({"size": {"depth": 3}}, "size has depth; valid keys: frames, height, width"),
    ],
)
def test_bad_settings_are_refused_by_name(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DistillSettings(**changes)


def test_more_steps_than_the_teachers_schedule_are_refused(tmp_path):
    with pytest.raises(
        ValueError, match="steps=1001 is more than the teacher's schedule of 1000 timesteps; valid: 1 to 1000"
    ):
        run("video", tmp_path / "run", steps=1001)
    assert not (tmp_path / "run").exists()


def test_an_out_folder_of_another_run_or_of_something_else_is_refused(tmp_path):
    run("video", tmp_path / "run", max_steps=1, ode_steps=1)
    with pytest.raises(ValueError, match=r"holds another run's state \(steps=2 there, 3 here\)"):
        run("video", tmp_path / "run", steps=3, max_steps=2, ode_steps=1)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not a distillation run's folder"):
        run("video", tmp_path / "other")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--steps", "0"], "steps=0 must be an integer >= 1"),
        (["--method", "gan"], "method='gan' is unknown; valid: dmd, consistency"),
    ],
)
def test_cli_refuses_bad_options_before_loading_the_teacher(tmp_path, options, message):
    result = CliRunner().invoke(distill_command, ["--teacher", "ref-video", "--out", str(tmp_path / "o"), *options])
    assert result.exit_code != 0
    assert message in result.output
    assert not (tmp_path / "o").exists()


def test_cli_refuses_an_unknown_teacher(tmp_path):
    result = CliRunner().invoke(distill_command, ["--teacher", "no-such-model", "--out", str(tmp_path / "o")])
    assert result.exit_code != 0
    assert "unknown model 'no-such-model'; valid: ref-video" in result.output


def test_a_run_killed_mid_training_resumes_from_its_last_save_bit_for_bit(tmp_path, monkeypatch):
    whole = run("video", tmp_path / "whole", max_steps=5)
    kill_at_the_second_call(monkeypatch, _Run, "dmd_step",  # a state after every step
                            lambda: run("video", tmp_path / "killed", max_steps=5, save_every=0))
    assert json.loads((tmp_path / "killed" / "state" / "state.json").read_text())["step"] == 3
    resumed = run("video", tmp_path / "killed", max_steps=5, save_every=0)
    assert resumed["steps_trained"] == whole["steps_trained"] == 5
    a = load_file(str(state.tensors_path(tmp_path / "whole")))
    b = load_file(str(state.tensors_path(tmp_path / "killed")))
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_judge_evaluation_is_logged_and_kept_in_the_state(tmp_path):
    from cadence.reference import data

    c = conditions("video")
    c.heldout_tokens = torch.randn(2, 5, TEXT_DIM, generator=torch.Generator().manual_seed(9))
    c.heldout_captions = data.heldout_prompts(2, video=True)
    distill(
        tiny_pipe("video"),
        tmp_path / "run",
        settings=settings("video", max_steps=2, ode_steps=1, eval_every=1e-9, eval_prompts=2),
        conditions=c,
        progress=False,
    )
    evaluations = json.loads((tmp_path / "run" / "state" / "state.json").read_text())["evaluations"]
    assert [e["step"] for e in evaluations] == [1, 2]
    assert all(0.0 <= e["adherence"] <= 1.0 and e["fd"] >= 0.0 for e in evaluations)
    record = json.loads((tmp_path / "run" / "student.json").read_text())
    assert record["evaluations"] == evaluations
    teacher = record["teacher_evaluation"]  # judged once, at sample_steps with CFG
    assert teacher["steps"] == 2 and teacher["guidance_scale"] == 4.0 and 0.0 <= teacher["adherence"] <= 1.0
    card = (tmp_path / "run" / "README.md").read_text()
    assert f"adherence {evaluations[-1]['adherence']:.3f}" in card and f"adherence {teacher['adherence']:.3f}" in card


def test_cli_distils_a_checkpoint_folder_resumes_it_and_refuses_other_settings(tmp_path):
    teacher, embeddings = teacher_folder(tmp_path)
    options = [
        "--teacher",
        str(teacher),
        "--out",
        str(tmp_path / "student"),
        *TINY_DISTILL,
        "--eval-every",
        "0",
        "--embeddings",
        str(embeddings),
    ]
    first = CliRunner().invoke(distill_command, [*options, "--steps", "2"])
    assert first.exit_code == 0, first.output
    assert "2-step student" in first.output and "3 steps in" in first.output
    again = CliRunner().invoke(distill_command, [*options, "--steps", "2", "--max-steps", "4"])
    assert again.exit_code == 0 and "4 steps in" in again.output  # resumed: one more step
    refused = CliRunner().invoke(distill_command, [*options, "--steps", "3"])
    assert refused.exit_code != 0 and "holds another run's state (steps=2 there, 3 here)" in refused.output
    pipe = cadence.load(str(tmp_path / "student"), text_encoder=False)
    assert pipe.student["steps"] == 2 and pipe.sampling_defaults(None, None) == (2, 1.0)


def test_a_damaged_student_record_is_refused_when_loading(tmp_path):
    run("video", tmp_path / "run", max_steps=1, ode_steps=1)
    record = json.loads((tmp_path / "run" / "student.json").read_text())
    record["sigmas"] = record["sigmas"][:1]  # two steps, one sigma
    (tmp_path / "run" / "student.json").write_text(json.dumps(record))
    with pytest.raises(
        ValueError,
        match=r"student.json: steps=2 and sigmas=\[1.0\] must be a positive step count and "
        "one sigma per step",
    ):
        cadence.load(str(tmp_path / "run"), text_encoder=False)


# -- review fixes: the state's commit point, the resumed identity, the warm-up, DMD's sign, bf16 ---------------------


def test_a_kill_between_the_tensor_file_and_the_json_leaves_the_previous_state_whole(tmp_path, monkeypatch):
    whole = run("video", tmp_path / "whole", max_steps=5)
    run("video", tmp_path / "three", max_steps=3)  # what the killed run's last whole state must be
    commit = state._commit

    def killed_before_the_json_of_step_4(target, record):
        if record["step"] == 4:
            raise KeyboardInterrupt  # the tensors of step 4 are on disk, the JSON still says step 3
        commit(target, record)

    monkeypatch.setattr(state, "_commit", killed_before_the_json_of_step_4)
    with pytest.raises(KeyboardInterrupt):
        run("video", tmp_path / "killed", max_steps=5, save_every=0)
    monkeypatch.setattr(state, "_commit", commit)
    folder = tmp_path / "killed" / "state"
    assert (folder / "state-4.safetensors").is_file()  # the new tensors were written ...
    record = json.loads((folder / "state.json").read_text())
    assert record["step"] == 3 and record["tensors"] == "state-3.safetensors"  # ... but never committed
    previous = json.loads((tmp_path / "three" / "state" / "state.json").read_text())
    assert record["history"] == previous["history"]
    a = load_file(str(state.tensors_path(tmp_path / "three")))
    b = load_file(str(state.tensors_path(tmp_path / "killed")))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)

    resumed = run("video", tmp_path / "killed", max_steps=5, save_every=0)
    assert resumed["steps_trained"] == whole["steps_trained"] == 5
    a = load_file(str(state.tensors_path(tmp_path / "whole")))
    b = load_file(str(state.tensors_path(tmp_path / "killed")))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    histories = [
        json.loads((tmp_path / n / "state" / "state.json").read_text())["history"] for n in ("whole", "killed")
    ]
    assert histories[0] == histories[1]
    # The orphan and every older tensor file are gone: one tensor file, the one the JSON names.
    assert sorted(p.name for p in folder.glob("state*.safetensors")) == [state.tensors_path(tmp_path / "killed").name]


@pytest.mark.parametrize(
    ("changes", "named"),
    [({"eval_prompts": 3}, "eval_prompts=8 there, 3 here"), ({"sample_steps": 3}, "sample_steps=2 there, 3 here")],
)
def test_resuming_with_other_evaluation_settings_is_refused(tmp_path, changes, named):
    run("video", tmp_path / "run", max_steps=1, ode_steps=1)
    with pytest.raises(ValueError, match=rf"holds another run's state \({named}\)"):
        run("video", tmp_path / "run", max_steps=2, ode_steps=1, **changes)


def test_resuming_on_other_conditions_is_refused(tmp_path):
    from safetensors.torch import save_file

    c = conditions("video")
    files = [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    for index, path in enumerate(files):
        save_file({"train_tokens": c.tokens + index, "empty_tokens": c.empty_tokens}, str(path))

    def resume(**where):
        return distill(
            tiny_pipe("video"),
            tmp_path / "run",
            settings=settings("video", max_steps=1, ode_steps=1),
            progress=False,
            **where,
        )

    resume(embeddings=files[0])
    assert json.loads((tmp_path / "run" / "state" / "state.json").read_text())["conditions"] == str(files[0].resolve())
    resume(embeddings=files[0])  # the same file resumes
    with pytest.raises(
        ValueError,
        match=rf"holds another run's state \(conditions='{files[0].resolve()}' there, '{files[1].resolve()}' here\)",
    ):
        resume(embeddings=files[1])
    with pytest.raises(ValueError, match=r"conditions='.*a.safetensors' there, 'given [0-9a-f]{16}' here"):
        resume(conditions=c)


def test_warm_up_restarts_at_the_first_dmd_step_for_generator_and_critic(tmp_path):
    pipe = tiny_pipe("video")
    run_ = new_run(pipe, tmp_path, ode_steps=150, lr=1e-3, critic_lr=2e-3)

    def rates(step):
        run_.step = step
        run_._learning_rates()
        return [run_.optimizers[name].param_groups[0]["lr"] for name in ("student", "critic")]

    assert rates(0) == pytest.approx([1e-5, 2e-5])  # the ODE phase's first step: 1 / 100 of the rate
    assert rates(149) == pytest.approx([1e-3, 2e-3])  # warmed up by its end
    assert rates(150) == pytest.approx([1e-5, 2e-5])  # the first DMD step starts again, the critic too
    assert rates(150 + 49) == pytest.approx([5e-4, 1e-3])
    assert rates(150 + 99) == pytest.approx([1e-3, 2e-3])


class PointMassScore(torch.nn.Module):
    """The exact flow-matching score of a point mass at ``x0``: the velocity (x_t - x0) / sigma, so
    its x0 prediction is x0 itself. A critic fitted perfectly to a student that always outputs x0."""

    def __init__(self, x0: torch.Tensor, timestep_scale: float):
        super().__init__()
        self.x0, self.timestep_scale = x0.detach().clone(), timestep_scale

    def forward(self, hidden_states, timestep, **_):
        sigma = (timestep / self.timestep_scale).view((-1,) + (1,) * (hidden_states.dim() - 1))
        return ((hidden_states - self.x0) / sigma,)


@pytest.mark.parametrize("kind", ["video", "image"])
def test_a_generator_step_moves_x0_toward_the_real_x0(kind, monkeypatch):
    pipe = tiny_pipe(kind)
    denoiser, c = Denoiser(pipe, SIZES[kind]), conditions(kind)
    teacher = pipe.transformer.float().requires_grad_(False)
    condition, empty = c.batch(torch.arange(2), "cpu"), c.empty(2, "cpu")
    start = denoiser.noise(2, torch.Generator().manual_seed(0), "cpu")
    seen = {}
    gradient = dmd.dmd_gradient

    def spy(x0, real_x0, fake_x0):
        seen.update(real_x0=real_x0, fake_x0=fake_x0)
        return gradient(x0, real_x0, fake_x0)

    monkeypatch.setattr(dmd, "dmd_gradient", spy)

    def one_step(critic):
        x0 = start.clone().requires_grad_(True)
        loss = dmd.generator_loss(
            denoiser, teacher, critic, x0, condition, empty, 4.0, torch.Generator().manual_seed(1)
        )
        loss.backward()
        return x0.detach(), (x0 - 0.05 * x0.numel() * x0.grad).detach()  # a step of 0.05 g (the grad is g / numel)

    def distance(a, b):
        return (a - b).flatten(1).norm(dim=1)  # per sample

    # The critic knows the student's samples exactly (fake x0 = x0): the step goes straight to the real x0.
    before, after = one_step(PointMassScore(start, 1000.0 if kind == "video" else 1.0))
    assert torch.allclose(seen["fake_x0"], before, atol=1e-4)
    assert (distance(after, seen["real_x0"]) < distance(before, seen["real_x0"])).all()
    # Any other critic: the step moves x0 toward the real x0 and away from the fake one. |x - real|^2 - |x - fake|^2
    # is linear in x with slope 2 (fake - real), so it falls by exactly 2 * 0.05 |fake - real|^2 / scale; a flipped
    # sign would raise it.
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    before, after = one_step(other)
    real, fake = seen["real_x0"], seen["fake_x0"]
    assert not torch.allclose(real, fake)

    def pull(x):
        return distance(x, real) ** 2 - distance(x, fake) ** 2

    assert (pull(after) < pull(before)).all()


def test_evaluation_and_samples_use_the_bf16_weights_as_shipped(tmp_path, monkeypatch):
    from cadence.reference import data

    c = conditions("video")
    c.heldout_tokens = torch.randn(2, 5, TEXT_DIM, generator=torch.Generator().manual_seed(9))
    c.heldout_captions = data.heldout_prompts(2, video=True)
    generate, students = _Run.generate, []

    def spy(self, transformer, condition, grid, guidance_scale=1.0, seed=0):
        if transformer is not self.teacher:
            trained = dict(self.student.named_parameters())
            students.append({name: (p, trained[name].detach().clone()) for name, p in transformer.named_parameters()})
        return generate(self, transformer, condition, grid, guidance_scale, seed)

    monkeypatch.setattr(_Run, "generate", spy)
    distill(
        tiny_pipe("video"),
        tmp_path / "run",
        settings=settings("video", max_steps=2, ode_steps=1, eval_every=1e-9, eval_prompts=2),
        conditions=c,
        progress=False,
    )
    assert len(students) == 3  # two evaluations and samples.png
    for pairs in students:
        assert all(p.dtype == torch.float32 and torch.equal(p, t.bfloat16().float()) for p, t in pairs.values())
        assert any(not torch.equal(p, t) for p, t in pairs.values())  # the rounding is real: not the fp32 weights
    shipped = cadence.load(str(tmp_path / "run"), text_encoder=False).transformer
    last = students[-1]
    assert all(torch.equal(p, last[name][0]) for name, p in shipped.named_parameters())
    assert "bf16 weights as shipped" in (tmp_path / "run" / "README.md").read_text()
