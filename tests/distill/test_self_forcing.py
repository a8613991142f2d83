"""The causal student (issue 18's ref-stream) on tiny Wan models: the stream engine's KV-cache loop
is the block-causal full-sequence rollout for the same noise (the contract that lets training
skip the cache), the one grad forward gives every chunk its rollout output, a chunk never sees a
later one, remove() gives the model back exactly, a self-forcing run resumes bit for bit and
writes a student that cadence.stream runs at its own sigmas, its ODE phase fits its pairs, and
bad configuration is refused by name."""

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import TEXT_DIM, kill_at_the_second_call, text, tiny_flux, tiny_pipe, tiny_wan
from diffusers import FlowMatchEulerDiscreteScheduler
from safetensors.torch import load_file

import cadence
from cadence.accel.sequence import FullConfig
from cadence.distill import Conditions, DistillSettings, distill, self_forcing, state
from cadence.distill.causal import apply_block_causal, block_causal
from cadence.distill.cli import distill as distill_command
from cadence.distill.student import Condition, Denoiser
from cadence.distill.trainer import _Run
from cadence.stream import stream

SIGMAS = [1.0, 0.75, 0.5, 0.25]  # the student's 4-step grid at shift 1
SIZE = {"frames": 4, "height": 8, "width": 8}  # two chunks of 2 frames
# The stream and the masked forward add up the same terms in other orders (cache [past, chunk] against
# one masked sequence; a timestep embedding per token against one per call): measured 3.6e-7 on values ~5.
ATOL = 1e-5


def _noise(chunks: int, frames: int, seed: int, batch: int = 1) -> torch.Tensor:
    """The stream's noise: one draw per chunk from one CPU generator, in order (engine._chunk)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(batch, 3, frames, 8, 8, generator=generator) for _ in range(chunks)], dim=2)


def _stream(model, chunks: int, frames: int, seed: int, **options) -> torch.Tensor:
    streamed = stream(
        model,
        text(),
        chunks=chunks,
        frames_per_chunk=frames,
        steps_per_chunk=4,
        policy=FullConfig(),
        height=8,
        width=8,
        seed=seed,
        decode=False,
        **options,
    )
    return torch.cat([chunk.latents for chunk in streamed], dim=2)


def test_the_stream_engine_is_the_block_causal_rollout_for_the_same_noise():
    model = tiny_wan()
    streamed = _stream(model, 3, 2, seed=3, sigmas=SIGMAS, scheduler=FlowMatchEulerDiscreteScheduler())
    with torch.no_grad(), block_causal(model, 2) as causal:
        rolled, _ = causal.rollout(_noise(3, 2, seed=3), SIGMAS, text())
    torch.testing.assert_close(rolled, streamed, rtol=0, atol=ATOL)
    # The comparison can fail: the same noise through the model run bidirectionally is far from it.
    with torch.no_grad():
        x = _noise(3, 2, seed=3)
        for sigma, after in zip(SIGMAS, [*SIGMAS[1:], 0.0]):
            v = model(
                hidden_states=x, timestep=torch.tensor([sigma * 1000]), encoder_hidden_states=text(), return_dict=False
            )[0]
            x = x + (after - sigma) * v
    assert (x - streamed).abs().max() > 100 * ATOL


def test_a_student_pipeline_streams_at_its_own_sigmas():
    from cadence.distill.student import student_pipeline

    teacher = tiny_pipe("video")
    pipe = student_pipeline(teacher, tiny_wan(), SIGMAS, SIZE)
    streamed = _stream(pipe, 2, 2, seed=1)  # no sigmas given: the student's
    with torch.no_grad(), block_causal(pipe.transformer, 2) as causal:
        rolled, _ = causal.rollout(_noise(2, 2, seed=1), SIGMAS, text())
    torch.testing.assert_close(rolled, streamed, rtol=0, atol=ATOL)
    spread = _stream(pipe, 2, 2, seed=1, sigmas=[1.0, 0.6, 0.3, 0.1])
    assert (spread - streamed).abs().max() > 100 * ATOL


@pytest.mark.parametrize("exit_step", [0, 2, 3])
def test_the_grad_forward_gives_every_chunk_its_rollout_output(exit_step):
    model = tiny_wan()
    condition = Condition(text(batch=2))
    noise = _noise(2, 2, seed=4, batch=2)
    with block_causal(model, 2) as causal:
        with torch.no_grad():
            rolled, _ = causal.rollout(noise, SIGMAS, condition.tokens, exit_step)
        sampled = self_forcing.student_sample(causal, noise, SIGMAS, exit_step, condition)
    assert sampled.requires_grad
    torch.testing.assert_close(sampled, rolled, rtol=0, atol=ATOL)
    sampled.square().mean().backward()
    assert all(p.grad is not None for p in model.blocks[0].attn1.parameters())


def test_a_chunk_never_sees_a_later_chunk():
    model = tiny_wan()
    noise = _noise(3, 2, seed=5)
    changed = noise.clone()
    changed[:, :, 4:] = torch.randn(1, 3, 2, 8, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), block_causal(model, 2) as causal:
        a, _ = causal.rollout(noise, SIGMAS, text())
        b, _ = causal.rollout(changed, SIGMAS, text())
        # teacher-forced: later noisy chunks and the context of later chunks change nothing earlier
        sigma = torch.full((1, 3), 0.5)
        c = causal.velocity(noise, sigma, text(), clean=a[:, :, :4])
        d = causal.velocity(changed, sigma, text(), clean=torch.cat([a[:, :, :2], b[:, :, 2:4] + 1], dim=2))
    assert torch.equal(a[:, :, :4], b[:, :, :4]) and not torch.equal(a[:, :, 4:], b[:, :, 4:])
    assert torch.equal(c[:, :, :4], d[:, :, :4]) and not torch.equal(c[:, :, 4:], d[:, :, 4:])


def test_the_first_chunk_alone_is_the_plain_model():
    model = tiny_wan()
    x = _noise(1, 2, seed=7, batch=2)
    with torch.no_grad():
        plain = model(
            hidden_states=x, timestep=torch.full((2,), 750.0), encoder_hidden_states=text(batch=2), return_dict=False
        )[0]
        with block_causal(model, 2) as causal:
            masked = causal.velocity(x, torch.full((2, 1), 0.75), text(batch=2))
    torch.testing.assert_close(masked, plain, rtol=0, atol=ATOL)


def test_remove_restores_bit_identical_outputs():
    model = tiny_wan()
    processors = [block.attn1.processor for block in model.blocks]
    x = _noise(2, 2, seed=8)

    def forward():
        with torch.no_grad():
            return model(
                hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text(), return_dict=False
            )[0]

    before = forward()
    causal = apply_block_causal(model, 2)
    assert torch.equal(forward(), before)  # a plain call through the stand-ins is the model's own
    with torch.no_grad():
        masked = causal.velocity(x, torch.full((1, 2), 0.5), text())
    assert not torch.equal(masked, before)
    causal.remove()
    assert [block.attn1.processor for block in model.blocks] == processors
    assert torch.equal(forward(), before)


# -- training ----------------------------------------------------------------------------------


def conditions(count: int = 6) -> Conditions:
    generator = torch.Generator().manual_seed(5)
    return Conditions(
        tokens=torch.randn(count, 5, TEXT_DIM, generator=generator),
        empty_tokens=torch.randn(1, 5, TEXT_DIM, generator=generator),
    )


def settings(**changes) -> DistillSettings:
    base = {
        "method": "self-forcing",
        "chunk_frames": 2,
        "steps": 2,
        "batch_size": 2,
        "critic_updates": 1,
        "ode_steps": 2,
        "ode_pairs": 4,
        "teacher_steps": 4,
        "max_steps": 4,
        "seconds": 1e6,
        "eval_every": None,
        "save_every": 1e9,
        "sample_prompts": 1,
        "sample_steps": 2,
        "lr": 1e-3,
        "critic_lr": 1e-3,
        "size": SIZE,
    }
    return DistillSettings(**(base | changes))


def run(out, **changes) -> dict:
    return distill(tiny_pipe("video"), out, settings=settings(**changes), conditions=conditions(), progress=False)


def test_a_killed_self_forcing_run_resumes_bit_for_bit_and_streams_at_its_sigmas(tmp_path, monkeypatch):
    whole = run(tmp_path / "whole")
    kill_at_the_second_call(monkeypatch, _Run, "self_forcing_step", lambda: run(tmp_path / "killed", save_every=0))
    assert json.loads((tmp_path / "killed" / "state" / "state.json").read_text())["step"] == 3
    resumed = run(tmp_path / "killed", save_every=0)
    assert resumed["steps_trained"] == whole["steps_trained"] == 4
    a, b = (load_file(str(state.tensors_path(tmp_path / name))) for name in ("whole", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    history = json.loads((tmp_path / "whole" / "state" / "state.json").read_text())["history"]
    assert [h["phase"] for h in history] == ["ode", "ode", "self-forcing", "self-forcing"]
    teacher = tiny_pipe("video").transformer.state_dict()
    assert any(not torch.equal(a[f"student.{k}"], v.float()) for k, v in teacher.items())  # it trained

    for name in ("student.json", "loss.png", "samples.png", "README.md", "model_index.json"):
        assert (tmp_path / "whole" / name).is_file(), name
    record = json.loads((tmp_path / "whole" / "student.json").read_text())
    assert record["causal"] is True and record["chunk_frames"] == 2 and record["method"] == "self-forcing"
    assert "--frames-per-chunk 2 --steps-per-chunk 2" in (tmp_path / "whole" / "README.md").read_text()
    pipe = cadence.load(str(tmp_path / "whole"), text_encoder=False)
    assert pipe.student["sigmas"] == record["sigmas"]
    streamed = stream(
        pipe,
        text(),
        chunks=2,
        frames_per_chunk=2,
        steps_per_chunk=2,
        policy=FullConfig(),
        seed=2,
        height=8,
        width=8,
        decode=False,
    )
    streamed = torch.cat([chunk.latents for chunk in streamed], dim=2)
    with torch.no_grad(), block_causal(pipe.transformer, 2) as causal:
        rolled, _ = causal.rollout(_noise(2, 2, seed=2), record["sigmas"], text())
    torch.testing.assert_close(rolled, streamed, rtol=0, atol=ATOL)


def test_the_causal_ode_phase_lowers_its_regression_loss_on_a_fixed_batch(tmp_path):
    pipe = tiny_pipe("video")
    run_ = _Run(
        pipe,
        Denoiser(pipe, SIZE),
        settings(ode_pairs=4, batch_size=4, lr=3e-3, ode_steps=12),
        conditions(),
        tmp_path,
        "cpu",
        "tiny",
    )
    pairs = run_._pairs()
    index = torch.arange(4)
    steps = torch.tensor([[0, 1], [1, 0], [1, 1], [0, 0]])  # every chunk at every student step
    condition = run_.conditions.batch(pairs["condition"][index], "cpu")

    def loss():
        with torch.no_grad(), block_causal(run_.student, 2) as causal:
            return float(
                self_forcing.regression_loss(
                    causal, pairs["points"][:, index], pairs["x0"][index], run_.sigmas, steps, condition
                )
            )

    before = loss()
    for run_.step in range(12):
        run_._learning_rates()
        assert run_.ode_step()["phase"] == "ode"
    assert loss() < 0.8 * before


# -- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"chunk_frames": None}, "chunk_frames=None must be an integer >= 1 for method='self-forcing'"),
        ({"chunk_frames": 0}, "chunk_frames=0 must be an integer >= 1 for method='self-forcing'"),
        ({"method": "dmd"}, "chunk_frames=2 is read by the causal methods only (self-forcing); method='dmd' takes"),
        ({"steps": 0}, "steps=0 must be an integer >= 1"),
    ],
)
def test_bad_settings_are_refused_by_name(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        settings(**changes)


def test_a_chunk_that_does_not_divide_the_clip_or_an_image_teacher_is_refused(tmp_path):
    with pytest.raises(ValueError, match="chunk_frames=3 does not divide the clip's 4 latent frames; valid: 1, 2, 4"):
        run(tmp_path / "a", chunk_frames=3)
    with pytest.raises(ValueError, match="trains a causal video student chunk by chunk; the teacher .* makes images"):
        distill(
            tiny_pipe("image"),
            tmp_path / "b",
            settings=settings(size={"height": 8, "width": 8}),
            conditions=conditions(),
            progress=False,
        )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_block_causal_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="needs a Wan transformer .*; got FluxTransformer2DModel"):
        apply_block_causal(tiny_flux(), 2)
    with pytest.raises(ValueError, match="chunk_frames=0; valid: an int >= 1"):
        apply_block_causal(tiny_wan(), 0)
    model = tiny_wan()
    with block_causal(model, 2) as causal:
        with pytest.raises(ValueError, match=r"sigma of shape \(1, 1\); valid: \(batch=1, chunks=2\)"):
            causal.velocity(_noise(2, 2, seed=0), torch.ones(1, 1), text())
        with pytest.raises(ValueError, match="noisy frames 3 and clean frames 0; valid: whole chunks of 2 frames"):
            causal.velocity(torch.zeros(1, 3, 3, 8, 8), torch.ones(1, 1), text())
        with pytest.raises(ValueError, match="exit_step=4; valid: 0 to 3"):
            causal.rollout(_noise(1, 2, seed=0), SIGMAS, text(), exit_step=4)
        with pytest.raises(ValueError, match="past the model's rotary table of 32 positions"):
            causal.velocity(_noise(1, 2, seed=0), torch.ones(1, 1), text(), first_chunk=16)
        with pytest.raises(ValueError, match=r"an input of 34 frames \(clean 30 \+ noisy 4\) reaching frame position 29"):
            causal.velocity(_noise(1, 4, seed=0), torch.ones(1, 2), text(), clean=_noise(1, 30, seed=1))
        # at the table's edge: 16 clean frames and 16 noisy ones, 32 in one input
        assert causal.velocity(_noise(1, 16, seed=0), torch.ones(1, 8), text(), clean=_noise(1, 16, seed=1)).isfinite().all()
        with pytest.raises(ValueError, match="processor is _Masked, not diffusers' own"):
            apply_block_causal(model, 2)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"sigmas": [1.0, 0.5]}, "sigmas=[1.0, 0.5]; valid: 4 noise levels (one per step of a chunk), decreasing"),
        ({"sigmas": [0.25, 0.5, 0.75, 1.0]}, "valid: 4 noise levels (one per step of a chunk), decreasing"),
        (
            {"sigmas": SIGMAS, "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0)},
            "with a scheduler of shift=3.0: set_timesteps would shift them again",
        ),
    ],
)
def test_the_stream_refuses_sigmas_it_cannot_run(options, message):
    with pytest.raises(
        ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")
    ):
        stream(tiny_wan(), text(), chunks=2, frames_per_chunk=2, steps_per_chunk=4, height=8, width=8, **options)


def test_cli_refuses_a_chunk_size_for_a_method_that_reads_none(tmp_path):
    result = CliRunner().invoke(
        distill_command,
        ["--teacher", "ref-video", "--method", "dmd", "--chunk-frames", "4", "--out", str(tmp_path / "o")],
    )
    assert result.exit_code != 0
    assert "chunk_frames=4 is read by the causal methods only (self-forcing)" in result.output
    assert not (tmp_path / "o").exists()


def test_samples_of_a_causal_student_are_its_chunk_by_chunk_rollout(tmp_path, monkeypatch):
    rollouts = []
    generate = self_forcing.generate

    def spy(causal, noise, sigmas, condition):
        rollouts.append((causal.chunk_frames, noise.shape, list(sigmas)))
        return generate(causal, noise, sigmas, condition)

    monkeypatch.setattr(self_forcing, "generate", spy)
    summary = run(tmp_path / "run", max_steps=1, ode_steps=1)
    assert rollouts == [(2, (1, 3, 4, 8, 8), summary["sigmas"])]  # samples.png's student row, one condition


def test_the_generator_gradient_vanishes_when_the_critic_is_the_real_score_and_not_otherwise():
    from cadence.distill import dmd

    pipe = tiny_pipe("video")
    student, teacher, other = pipe.transformer, tiny_wan(), tiny_wan()
    with torch.no_grad():
        other.proj_out.bias.add_(0.1)  # a fake score that is not the real one
    denoiser, condition = Denoiser(pipe, SIZE), Condition(text(batch=2))
    grads = []
    for critic in (teacher, other):
        student.zero_grad()
        with block_causal(student, 2) as causal:
            x0 = self_forcing.student_sample(causal, _noise(2, 2, seed=9, batch=2), SIGMAS, 1, condition)
        loss = dmd.generator_loss(denoiser, teacher, critic, x0, condition, None, 1.0, torch.Generator().manual_seed(0))
        loss.backward()
        grads.append(max(float(p.grad.abs().max()) for p in student.parameters() if p.grad is not None))
    assert grads[0] == 0.0 and grads[1] > 0.0


def test_each_method_resumes_on_the_settings_it_reads():
    dmd_identity = DistillSettings(method="dmd").identity()
    causal_identity = settings().identity()
    assert "critic_updates" in dmd_identity and "chunk_frames" not in dmd_identity
    assert {"critic_updates", "critic_lr", "chunk_frames"} <= causal_identity.keys()
    assert "ema_decay" not in causal_identity and "skip" not in causal_identity
