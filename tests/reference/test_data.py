"""The procedural captioned data: captions, splits, and that the pixels do what the captions say."""

from dataclasses import replace

import pytest
import torch

from cadence.reference.data import (
    BACKGROUNDS,
    COLOURS,
    MOTIONS,
    SHAPES,
    SIZES,
    ClipSpec,
    ObjectSpec,
    caption,
    heldout_prompts,
    is_heldout,
    parse_caption,
    render,
    render_images,
    sample_specs,
    satisfies_constraints,
    train_captions,
)


def one_object(motion, shape="square", colour="red", size="large", background="plain", background_colour="blue"):
    return ClipSpec((ObjectSpec(shape, colour, size, motion),), background, background_colour)


def red_coverage(video):
    """Per-frame weight of 'red object here' for a red object on a blue background: (B, T, H, W)."""
    rgb = (video + 1) / 2
    return (rgb[:, 0] - rgb[:, 2]).clamp(min=0)


def centroid_x(weight):
    x = torch.arange(weight.shape[-1], dtype=torch.float32)
    return (weight.sum(-2) * x).sum(-1) / weight.sum((-2, -1))  # (B, T)


def centroid_y(weight):
    y = torch.arange(weight.shape[-2], dtype=torch.float32)
    return (weight.sum(-1) * y).sum(-1) / weight.sum((-2, -1))


# ----------------------------------------------------------------------------- vocabulary


def test_vocabulary():
    assert len(SHAPES) == 6 and len(COLOURS) == 8 and len(MOTIONS) == 10
    assert SIZES == ("small", "large") and BACKGROUNDS == ("plain", "gradient", "checkerboard")
    assert all(0.0 <= c <= 1.0 for rgb in COLOURS.values() for c in rgb)


# ----------------------------------------------------------------------------- captions


def test_caption_grammar():
    square = ObjectSpec("square", "red", "small", "moves left")
    circle = ObjectSpec("circle", "white", "large", "bounces")
    assert caption(ClipSpec((square,), "gradient", "blue")) == "a small red square moves left over a blue gradient"
    assert (
        caption(ClipSpec((square, circle), "gradient", "blue"))
        == "a small red square moves left and a large white circle bounces over a blue gradient"
    )
    assert caption(ClipSpec((square,), "plain", "blue")) == "a small red square moves left over a plain blue background"
    assert caption(ClipSpec((square,), "checkerboard", "blue")) == "a small red square moves left over a blue checkerboard"
    assert caption(ClipSpec((square,), "gradient", "blue"), video=False) == "a small red square over a blue gradient"


@pytest.mark.parametrize("video", [True, False])
def test_parse_caption_inverts_caption(video):
    specs = sample_specs(500, seed=7, video=video) + sample_specs(200, seed=8, split="heldout", video=video)
    for spec in specs:
        text = caption(spec, video)
        parsed = parse_caption(text)
        if video:
            assert parsed == spec, text
        else:  # image captions carry no motion
            still = tuple(replace(obj, motion="stays still") for obj in spec.objects)
            assert parsed == replace(spec, objects=still), text
        assert caption(parsed, video) == text


@pytest.mark.parametrize(
    "text",
    ["", "a red square", "a huge red square moves left over a blue gradient", "a small red square dances over a blue gradient"],
)
def test_parse_caption_rejects_garbage_naming_the_text(text):
    with pytest.raises(ValueError, match="cannot parse"):
        parse_caption(text)


def test_caption_rejects_unknown_words():
    with pytest.raises(ValueError, match="hexagon"):
        caption(one_object("moves left", shape="hexagon"))


# ----------------------------------------------------------------------------- sampling and splits


def test_sample_specs_is_deterministic():
    assert sample_specs(50, seed=3) == sample_specs(50, seed=3)
    assert sample_specs(50, seed=3) != sample_specs(50, seed=4)


@pytest.mark.parametrize("video", [True, False])
def test_sampled_specs_obey_constraints(video):
    specs = sample_specs(1000, seed=0, video=video)
    assert {len(s.objects) for s in specs} == {1, 2}
    for spec in specs:
        assert satisfies_constraints(spec)
        assert all(obj.colour != spec.background_colour for obj in spec.objects)
        assert not any(obj.motion == "rotates" and obj.shape in ("circle", "ring") for obj in spec.objects)
        if len(spec.objects) == 2:
            first, second = spec.objects
            assert (first.colour, first.shape) != (second.colour, second.shape)


@pytest.mark.parametrize("video", [True, False])
def test_splits_are_disjoint(video):
    train = train_captions(2000, video=video)
    assert len(set(train)) == 2000
    assert not any(is_heldout(s, video) for s in sample_specs(500, seed=5, video=video))
    assert all(is_heldout(s, video) for s in sample_specs(100, seed=5, split="heldout", video=video))

    prompts = heldout_prompts(video=video)
    assert len(prompts) == 32 and len(set(prompts)) == 32
    assert all(is_heldout(parse_caption(p), video) for p in prompts)
    assert not set(prompts) & set(train)
    assert not any(is_heldout(parse_caption(t), video) for t in train)


def test_heldout_prompts_start_with_simple_clear_cases():
    for video in (True, False):
        first = [parse_caption(p) for p in heldout_prompts(video=video)[:4]]
        assert all(len(spec.objects) == 1 for spec in first)
        assert len({spec.objects[0].shape for spec in first}) == 4
    assert all(spec.objects[0].motion != "stays still" for spec in map(parse_caption, heldout_prompts()[:4]))
    assert heldout_prompts(n=8) == heldout_prompts(n=8)
    assert heldout_prompts(n=8)[:4] == heldout_prompts(n=32)[:4]


def test_roughly_a_tenth_of_combinations_is_held_out():
    triples = [one_object(m, shape=s, colour=c) for s in SHAPES for c in COLOURS for m in MOTIONS]
    assert 0.05 < sum(map(is_heldout, triples)) / len(triples) < 0.15
    pairs = [one_object("stays still", shape=s, colour=c) for s in SHAPES for c in COLOURS]
    assert 0.05 < sum(is_heldout(p, video=False) for p in pairs) / len(pairs) < 0.25


@pytest.mark.parametrize(
    "call, bad",
    [
        (lambda: sample_specs(0, seed=0), "0"),
        (lambda: sample_specs(4, seed=0, split="test"), "'test'"),
        (lambda: train_captions(-3), "-3"),
        (lambda: heldout_prompts(n=0), "0"),
        (lambda: render([one_object("grows")], frames=0), "0"),
        (lambda: render([], frames=4), "empty"),
        (lambda: render([one_object("flies")]), "'flies'"),
        (lambda: render_images([one_object("grows", background="stripes")]), "'stripes'"),
    ],
)
def test_bad_arguments_raise_naming_the_value(call, bad):
    with pytest.raises(ValueError, match=bad):
        call()


def test_bad_split_lists_the_valid_ones():
    with pytest.raises(ValueError, match="'train'.*'heldout'"):
        sample_specs(4, seed=0, split="val")


# ----------------------------------------------------------------------------- rendering


def test_render_shape_range_and_determinism():
    specs = sample_specs(16, seed=2)
    video = render(specs, frames=8, size=24, seed=5)
    assert video.shape == (16, 3, 8, 24, 24) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    assert torch.equal(video, render(specs, frames=8, size=24, seed=5))
    assert not torch.equal(video, render(specs, frames=8, size=24, seed=6))


def test_render_images_shape_range_and_determinism():
    specs = sample_specs(16, seed=2, video=False)
    images = render_images(specs, size=32, seed=5)
    assert images.shape == (16, 3, 32, 32)
    assert images.min() >= -1 and images.max() <= 1
    assert torch.equal(images, render_images(specs, size=32, seed=5))
    assert not torch.equal(images, render_images(specs, size=32, seed=6))


def test_a_clip_does_not_depend_on_its_batch_neighbours_shapes():
    # The same seed gives each position the same nuisance draws, whatever else is in the batch.
    first = one_object("moves right")
    alone = render([first, one_object("grows", shape="ring")], seed=9)[0]
    with_other = render([first, one_object("bounces", shape="cross", colour="white")], seed=9)[0]
    assert torch.equal(alone, with_other)


def test_moves_right_moves_the_centroid_right():
    video = render([one_object("moves right", size="small")] * 4, frames=16, size=32, seed=0)
    x = centroid_x(red_coverage(video))
    assert (x[:, -1] - x[:, 0] > 12).all(), x  # about 0.85 of the frame width, +-20 %
    assert (x[:, 1:] > x[:, :-1]).all()


@pytest.mark.parametrize("motion, axis, sign", [("moves left", "x", -1), ("moves up", "y", -1), ("moves down", "y", 1)])
def test_other_straight_motions_go_their_way(motion, axis, sign):
    weight = red_coverage(render([one_object(motion, size="small")] * 4, seed=1))
    position = centroid_x(weight) if axis == "x" else centroid_y(weight)
    assert (sign * (position[:, -1] - position[:, 0]) > 12).all(), position


def test_grows_and_shrinks_change_the_area():
    video = render([one_object("grows", size="small"), one_object("shrinks", size="small")], seed=0)
    area = red_coverage(video).sum((-2, -1))  # (B, T)
    assert area[0, -1] > 3 * area[0, 0]
    assert area[1, 0] > 3 * area[1, -1]


def test_stays_still_stays_put():
    weight = red_coverage(render([one_object("stays still")] * 4, seed=3))
    for position in (centroid_x(weight), centroid_y(weight)):
        assert (position.max(1).values - position.min(1).values < 1.0).all()


def test_bounces_goes_up_and_down():
    y = centroid_y(red_coverage(render([one_object("bounces", size="small")] * 4, frames=32, seed=4)))
    assert (y.max(1).values - y.min(1).values > 10).all()


def test_rotates_changes_the_silhouette_but_not_the_area():
    video = render([one_object("rotates", shape="cross")], frames=16, seed=0)
    weight = red_coverage(video)[0]  # (T, H, W)
    area = weight.sum((-2, -1))
    assert (area.max() - area.min()) / area.mean() < 0.1
    assert (weight[0] - weight[4]).abs().sum() > 0.2 * area.mean()


def test_sizes_differ():
    video = render([one_object("stays still", size="small"), one_object("stays still", size="large")], seed=0)
    area = red_coverage(video)[:, 0].sum((-2, -1))
    assert area[1] > 2 * area[0]


def test_render_images_vary_the_frame_time():
    # Images of a moving object differ in position between clips: nuisance the caption omits.
    images = render_images([one_object("moves right", size="small")] * 8, seed=0)
    x = centroid_x(red_coverage(images[:, :, None])[:, 0])  # (B,)
    assert x.max() - x.min() > 4


# ----------------------------------------------------------------------------- an honest world


def test_a_plain_background_is_drawn_at_its_named_colour():
    from cadence.reference.data import _WHITE_BRIGHTNESS

    for colour, rgb in COLOURS.items():
        other = "red" if colour != "red" else "blue"
        video = render([one_object("stays still", colour=other, size="small", background_colour=colour)], frames=2, seed=0)
        corner = (video[0, :, 0, 0, 0] + 1) / 2  # the top-left pixel: background, the object sits within the centre
        named = torch.tensor([_WHITE_BRIGHTNESS] * 3 if colour == "white" else rgb)
        assert torch.allclose(corner, named, atol=1e-6), (colour, corner)


def test_gradients_and_checkerboards_reach_their_named_colour():
    for background in ("gradient", "checkerboard"):
        video = render([one_object("stays still", size="small", background=background, background_colour="white")],
                       frames=1, seed=3)
        brightest = ((video + 1) / 2).amax((-2, -1))[0, :, 0]  # per channel, over the frame
        assert (brightest > 0.9).all(), (background, brightest)


def test_every_object_colour_stands_out_from_every_other_background():
    from cadence.reference.data import MIN_CONTRAST, background_contrast

    for obj in COLOURS:
        for background_colour in COLOURS:
            if obj == background_colour:
                continue  # never sampled: satisfies_constraints refuses it
            for background in BACKGROUNDS:
                assert background_contrast(obj, background, background_colour) >= MIN_CONTRAST, (obj, background,
                                                                                                 background_colour)


def test_images_show_the_captioned_size_and_shape():
    # A growing object in an image would pass for the other size; a turned square for a diamond.
    grows, still = render_images([one_object("grows", size="small"), one_object("stays still", size="small")], seed=4)
    area = red_coverage(torch.stack([grows, still])[:, :, None])[:, 0].sum((-2, -1))
    assert area[0] == pytest.approx(area[1].item(), rel=0.05)
    turned = render_images([one_object("rotates", shape="square")] * 8, seed=5)
    upright = render_images([one_object("stays still", shape="square")] * 8, seed=5)
    assert torch.allclose(red_coverage(turned[:, :, None]).sum((-2, -1)), red_coverage(upright[:, :, None]).sum((-2, -1)),
                          rtol=0.02)


def test_captions_outside_the_grammar_are_refused_naming_what_is_wrong():
    with pytest.raises(ValueError, match="unknown words 'magenta', 'hexagon'; colours: red"):
        parse_caption("a small magenta hexagon moves left over a plain white background")
    with pytest.raises(ValueError, match="missing size word before 'red square'; sizes: 'small', 'large'"):
        parse_caption("a red square moves left over a blue gradient")
    with pytest.raises(ValueError, match="no background"):
        parse_caption("a small red square moves left")
    with pytest.raises(ValueError, match="no motion words"):
        parse_caption("a small red square moves left over a blue gradient", video=False)
    spec = parse_caption("a small red square over a blue gradient", video=False)
    assert spec.objects[0].motion == "stays still"
