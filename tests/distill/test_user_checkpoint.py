"""cadence distill on a user's own Wan or FLUX checkpoint (issue 17, build item 1), with the tiny
genuine diffusers pipelines of tiny_checkpoints.py saved as a user would save them: a few training
steps on the CPU give a full pipeline folder that cadence.load opens with the student's defaults
and that generates in K steps with one transformer forward each; a FLUX.1-dev-like teacher keeps its
embedded guidance in every forward; a resumed run is the uninterrupted one bit for bit; bad input
is refused by name before training."""

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_DISTILL, tiny_pipe
from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from safetensors.torch import load_file
from tiny_checkpoints import FLUX_SIZE, WAN_SIZE, size_options, tiny_flux_pipeline, tiny_wan_pipeline

import cadence
from cadence import generation
from cadence.distill import Conditions, DistillSettings, distill, state, user
from cadence.distill.cli import distill as distill_command
from cadence.distill.student import student_sigmas
from cadence.distill.user import StudentScheduler

PROMPTS = [
    f"a {colour} {animal} on a {place}"
    for colour in ("red", "blue")
    for animal in ("cat", "dog", "fox")
    for place in ("hill", "boat")
]  # 12
BUILDERS = {"wan": tiny_wan_pipeline, "flux": tiny_flux_pipeline}
SIZES = {"wan": WAN_SIZE, "flux": FLUX_SIZE}


def settings(kind: str, **changes) -> DistillSettings:
    base = {
        "steps": 2,
        "batch_size": 2,
        "critic_updates": 1,
        "ode_steps": 2,
        "ode_pairs": 2,
        "teacher_steps": 2,
        "max_steps": 4,
        "seconds": 1e6,
        "eval_every": 1e6,
        "save_every": 1e9,
        "eval_prompts": 2,
        "sample_prompts": 2,
        "sample_steps": 2,
        "lr": 1e-3,
        "critic_lr": 1e-3,
        "guidance_scale": 3.5,
        "size": SIZES[kind],
    }
    return DistillSettings(**(base | changes))


def guided_flux_pipeline():
    """The tiny FLUX with FLUX.1-dev's guidance embedding and its resolution-dependent shift."""
    pipe = tiny_flux_pipeline()
    torch.manual_seed(1)
    config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")} | {"guidance_embeds": True}
    pipe.transformer = FluxTransformer2DModel.from_config(config).eval()
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256
    )
    return pipe


def teacher_folder(tmp_path, kind: str, pipe=None):
    folder = tmp_path / f"teacher-{kind}"
    (pipe or BUILDERS[kind]()).save_pretrained(str(folder))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")  # blank lines are skipped
    return folder, prompts


def generate_counting(folder, kind: str, prompt: str = "a red cat on a hill"):
    """cadence.load the student folder, generate with its defaults -> (pipe, timesteps of every
    transformer forward, its guidance inputs, pixels)."""
    pipe = cadence.load(str(folder))
    timesteps, guidance = [], []

    def record(module, args, kwargs, out):
        timesteps.append(kwargs["timestep"])
        guidance.append(kwargs.get("guidance"))

    hook = pipe.transformer.register_forward_hook(record, with_kwargs=True)
    steps, scale = generation.sampling(pipe)
    size = generation.resolve_size(pipe, **{name: SIZES[kind].get(name) for name in ("height", "width", "frames")})
    pixels = generation.generate(pipe, prompt, steps=steps, seed=0, guidance_scale=scale, size=size)
    hook.remove()
    return pipe, timesteps, guidance, pixels


def test_wan_folder_distils_through_the_cli_into_a_pipeline_folder_that_runs_k_forwards(tmp_path):
    teacher, prompts = teacher_folder(tmp_path, "wan")
    out = tmp_path / "student"
    options = [
        "--teacher",
        str(teacher),
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--steps",
        "2",
        *TINY_DISTILL,
        *size_options(WAN_SIZE),
    ]
    result = CliRunner().invoke(distill_command, options)
    assert result.exit_code == 0, result.output
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline" and index["text_encoder"] == ["transformers", "UMT5EncoderModel"]
    for name in ("transformer", "vae", "scheduler", "text_encoder", "tokenizer"):
        assert (out / name).is_dir(), name
    teacher_weights = teacher / "text_encoder" / "model.safetensors"
    assert (out / "text_encoder" / "model.safetensors").read_bytes() == teacher_weights.read_bytes()
    record = json.loads((out / "student.json").read_text())
    wan_shift = tiny_wan_pipeline().scheduler
    assert record["sigmas"] == student_sigmas(wan_shift, 2) and record["guidance_scale"] == 1.0
    held = record["heldout_prompts"]
    assert len(held) == 8 and set(held) <= set(PROMPTS)  # max(eval_prompts, sample_prompts): the defaults 8, 4
    card = (out / "README.md").read_text()
    assert "Adherence and FD are not measured" in card and "PSNR" in card and held[0] in card
    assert set(record["evaluations"][-1]) >= {"psnr", "ssim"}

    pipe, timesteps, _, pixels = generate_counting(out, "wan")
    assert type(pipe).__name__ == "WanPipeline" and generation.sampling(pipe) == (2, 1.0)
    assert len(timesteps) == 2  # K forwards: guidance 1, no CFG branch
    assert torch.allclose(
        torch.stack([t.flatten()[0].float() for t in timesteps]), torch.tensor(record["sigmas"]) * 1000
    )
    assert pixels.shape == (WAN_SIZE["frames"], 3, WAN_SIZE["height"], WAN_SIZE["width"])
    assert torch.isfinite(pixels).all()
    # Other step counts are the scheduler's own: only K steps are the student's sigmas.
    pipe.scheduler.set_timesteps(3)
    plain = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    plain.set_timesteps(3)
    assert torch.equal(pipe.scheduler.sigmas, plain.sigmas)


def test_guided_flux_keeps_its_guidance_in_every_forward_and_as_the_students_default(tmp_path):
    teacher, prompts = teacher_folder(tmp_path, "flux", guided_flux_pipeline())
    out = tmp_path / "student"
    summary = distill(str(teacher), out, settings=settings("flux"), prompts=prompts, progress=False)
    assert summary["guidance_scale"] == 3.5 and summary["family"] == "flux"
    # The teacher's dynamic shift at this size is the fixed shift exp(mu) the student's sigmas went through.
    dynamic = guided_flux_pipeline()
    fixed = user.fixed_shift(dynamic, FLUX_SIZE)
    assert summary["sigmas"] == student_sigmas(fixed, 2) and fixed.config.shift > 1
    card = (out / "README.md").read_text()
    assert "embedded guidance 3.5, no CFG" in card and "guidance-distilled" in card

    pipe, timesteps, guidance, pixels = generate_counting(out, "flux")
    assert type(pipe).__name__ == "FluxPipeline" and generation.sampling(pipe) == (2, 3.5)
    assert len(timesteps) == 2 and all(float(g[0]) == 3.5 for g in guidance)
    assert torch.allclose(torch.stack([t.flatten()[0].float() for t in timesteps]), torch.tensor(summary["sigmas"]))
    assert pixels.shape == (3, FLUX_SIZE["height"], FLUX_SIZE["width"]) and torch.isfinite(pixels).all()


def test_every_training_forward_of_a_guided_flux_gets_the_guidance(tmp_path, monkeypatch):
    pipe = guided_flux_pipeline()
    seen = []
    original = FluxTransformer2DModel.forward

    def forward(self, *args, guidance=None, **kwargs):
        seen.append(None if guidance is None else guidance.unique().tolist())
        return original(self, *args, guidance=guidance, **kwargs)

    monkeypatch.setattr(FluxTransformer2DModel, "forward", forward)
    distill(pipe, tmp_path / "out", settings=settings("flux", max_steps=3), prompts=PROMPTS, progress=False)
    assert seen and all(g == [3.5] for g in seen)


def test_dynamic_shift_at_one_size_is_the_fixed_shift_exp_mu():
    pipe = guided_flux_pipeline()
    fixed = user.fixed_shift(pipe, FLUX_SIZE)
    sigmas = [1.0, 0.75, 0.5, 0.25]
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift(64, 16, 256, 0.5, 1.15)  # 16 x 16 latents packed 2 x 2: 64 tokens
    pipe.scheduler.set_timesteps(sigmas=sigmas, mu=mu)
    fixed.set_timesteps(sigmas=sigmas)
    assert torch.allclose(pipe.scheduler.sigmas, fixed.sigmas, atol=1e-6)


def test_a_pipeline_object_is_distilled_and_left_whole(tmp_path):
    pipe = tiny_wan_pipeline()
    encoder = pipe.text_encoder
    distill(pipe, tmp_path / "out", settings=settings("wan", max_steps=2), prompts=PROMPTS, progress=False)
    assert pipe.text_encoder is encoder  # the caller's object keeps its encoders; the folder gets them saved
    assert (tmp_path / "out" / "text_encoder" / "model.safetensors").is_file()
    _, timesteps, _, _ = generate_counting(tmp_path / "out", "wan")
    assert len(timesteps) == 2


def test_interrupted_wan_run_resumed_is_the_uninterrupted_run_bit_for_bit(tmp_path):
    teacher, prompts = teacher_folder(tmp_path, "wan")

    def run(name: str, max_steps: int) -> dict:
        torch.manual_seed(0)  # the global generator (saved in the state) as a fresh process would have it
        return distill(
            str(teacher),
            tmp_path / name,
            settings=settings("wan", max_steps=max_steps),
            prompts=prompts,
            progress=False,
        )

    run("whole", 4)
    run("parts", 3)  # stops inside DMD (ODE pairs: steps 0-1)
    resumed = run("parts", 4)
    assert resumed["steps_trained"] == 4
    a = load_file(str(state.tensors_path(tmp_path / "whole")))
    b = load_file(str(state.tensors_path(tmp_path / "parts")))
    assert a.keys() == b.keys()
    assert [key for key in a if not torch.equal(a[key], b[key])] == []
    teacher_weights = tiny_wan_pipeline().transformer.state_dict()
    assert any(not torch.equal(a[f"student.{k}"], v.float()) for k, v in teacher_weights.items())
    other = tmp_path / "other.txt"
    other.write_text("\n".join(reversed(PROMPTS)))
    with pytest.raises(ValueError, match=r"holds another run's state \(conditions="):
        distill(str(teacher), tmp_path / "parts", settings=settings("wan"), prompts=other, progress=False)


def test_heldout_prompts_are_a_seeded_share_apart_from_training():
    train, held = user.split(PROMPTS, 3, seed=0)
    assert len(held) == 3 and not set(train) & set(held) and sorted(train + held) == sorted(PROMPTS)
    assert user.split(PROMPTS, 3, seed=0) == (train, held) and user.split(PROMPTS, 3, seed=1)[1] != held


def test_student_scheduler_runs_the_student_sigmas_at_k_steps_only():
    config = FlowMatchEulerDiscreteScheduler().config
    scheduler = StudentScheduler.of(config, [1.0, 0.9, 0.4])
    scheduler.set_timesteps(3)
    assert scheduler.sigmas.tolist() == pytest.approx([1.0, 0.9, 0.4, 0.0])
    scheduler.set_timesteps(sigmas=[1.0, 0.66, 0.33])  # FluxPipeline's K default sigmas: the student's
    assert scheduler.sigmas.tolist() == pytest.approx([1.0, 0.9, 0.4, 0.0])
    with pytest.raises(ValueError, match="shift 1"):
        StudentScheduler.of(FlowMatchEulerDiscreteScheduler(shift=3.0).config, [1.0])


def test_a_folder_of_another_pipeline_is_refused_naming_the_classes_cadence_distils(tmp_path):
    folder = tmp_path / "sd"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(
        ValueError,
        match="is a StableDiffusionPipeline; cadence distill trains students of "
        "RefVideoPipeline, RefImagePipeline, WanPipeline, FluxPipeline",
    ):
        distill(str(folder), tmp_path / "out", settings=settings("wan"), prompts=PROMPTS, progress=False)


@pytest.mark.parametrize(
    ("changes", "prompts", "message"),
    [
        ({}, None, "a Wan or FLUX teacher needs prompts to distil on: --prompts FILE"),
        ({}, PROMPTS[:2], r"--prompts has 2 prompt\(s\); 3 are needed"),
        ({"eval_prompts": 12}, PROMPTS, r"--prompts has 12 prompt\(s\); 13 are needed"),
        ({"size": {"frames": 5, "height": 24, "width": 16}}, PROMPTS, "height=24 must be a multiple of 16"),
        ({"size": {"frames": 6, "height": 16, "width": 16}}, PROMPTS, "frames=6 must be 1 \\+ a multiple of 4"),
        ({"size": None}, PROMPTS, "rotary embedding reaches 32 patches"),
        ({"method": "self-forcing", "chunk_frames": 1}, PROMPTS, "trains a causal video student"),
    ],
)
def test_bad_input_for_a_wan_teacher_is_refused_before_training(tmp_path, changes, prompts, message):
    teacher, _ = teacher_folder(tmp_path, "wan")
    with pytest.raises(ValueError, match=message):
        distill(str(teacher), tmp_path / "out", settings=settings("wan", **changes), prompts=prompts, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_large_default_size_is_refused_and_a_small_one_taken():
    pipe = tiny_flux_pipeline()  # default 128 x 128 (VAE scale 1): 4096 tokens, the limit, is taken
    assert user.resolve_size(pipe, None) == {"height": 128, "width": 128}
    pipe.default_sample_size = 256  # 256 x 256: 16384 tokens
    with pytest.raises(ValueError, match="makes 16384 latent tokens a sample .* name the size to distil at"):
        user.resolve_size(pipe, None)


def test_cli_refuses_prompts_for_a_reference_teacher_and_a_missing_prompts_file(tmp_path):
    missing = CliRunner().invoke(
        distill_command,
        [
            "--teacher",
            str(teacher_folder(tmp_path, "wan")[0]),
            "--out",
            str(tmp_path / "out"),
            "--prompts",
            str(tmp_path / "none.txt"),
            "--device",
            "cpu",
            *size_options(WAN_SIZE),
        ],
    )
    assert missing.exit_code != 0 and "is not a file" in missing.output
    with pytest.raises(ValueError, match="prompts are for a Wan or FLUX teacher"):
        distill(
            tiny_pipe("video"),
            tmp_path / "ref",
            settings=settings("wan", size={"frames": 2, "height": 8, "width": 8}),
            prompts=PROMPTS,
            progress=False,
        )


def test_wan_conditions_are_the_pipelines_own_encodings_with_its_negative_prompt():
    pipe = tiny_wan_pipeline()
    made = Conditions(**user.conditions(pipe, PROMPTS, "blurry, still", heldout=3, seed=0))
    train, held = user.split(PROMPTS, 3, seed=0)
    positive, negative = pipe.encode_prompt(
        prompt=train, negative_prompt=["blurry, still"] * len(train), do_classifier_free_guidance=True, device="cpu"
    )
    # Encoded in other batches (the negative alone here): equal up to the batch's float rounding.
    assert torch.allclose(made.tokens, positive, atol=1e-5) and torch.allclose(
        made.empty_tokens, negative[:1], atol=1e-5
    )
    assert not torch.allclose(made.empty_tokens, user.encode(pipe, [""])[0], atol=1e-3)  # not the empty prompt
    assert made.heldout_captions == held and made.heldout_tokens.shape[0] == 3 and made.pooled is None


def test_embeddings_for_a_wan_teacher_are_refused(tmp_path):
    teacher, prompts = teacher_folder(tmp_path, "wan")
    with pytest.raises(ValueError, match="are the reference models' caption embeddings"):
        distill(
            str(teacher),
            tmp_path / "out",
            settings=settings("wan"),
            prompts=prompts,
            embeddings=tmp_path / "e.safetensors",
            progress=False,
        )
