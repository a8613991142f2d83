"""Procedural captioned clips and images: the reference models' training data and the
benchmark's prompt set.

A clip is one or two coloured shapes, each with a motion, over a coloured background.
Everything is generated from a seed, so the data needs no download and the benchmark's
prompts are the same on every machine:

    specs = sample_specs(256, seed=0)                  # list[ClipSpec]
    prompts = [caption(s) for s in specs]              # "a small red square moves left over a blue gradient"
    video = render(specs, frames=16, size=32, seed=0)  # (B, 3, T, H, W) in [-1, 1]
    image = render_images(specs, size=32, seed=0)      # (B, 3, H, W) in [-1, 1]

Splits are a pure function of the caption's content (a stable hash, no RNG state), so the
held-out (shape, colour, motion) combinations are never seen in training and the benchmark
measures generalisation to new combinations of known words.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

# --------------------------------------------------------------------------- vocabulary

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLOURS = {
    "red": (0.95, 0.10, 0.10),
    "orange": (1.00, 0.55, 0.00),
    "yellow": (0.95, 0.90, 0.10),
    "green": (0.10, 0.75, 0.15),
    "cyan": (0.10, 0.85, 0.90),
    "blue": (0.15, 0.30, 1.00),
    "purple": (0.60, 0.15, 0.90),
    "white": (0.95, 0.95, 0.95),
}
SIZES = ("small", "large")
MOTIONS = (
    "moves left",
    "moves right",
    "moves up",
    "moves down",
    "moves diagonally",
    "bounces",
    "grows",
    "shrinks",
    "rotates",
    "stays still",
)
BACKGROUNDS = ("plain", "gradient", "checkerboard")
SPLITS = ("train", "heldout")

# Radius of a shape's bounding circle as a fraction of the frame side: far enough apart
# that "small" and "large" are clearly different at 32x32 (about 4.5 px vs 7.7 px).
SIZE_RADIUS = {"small": 0.14, "large": 0.24}
# Rotation of a shape with full rotational symmetry is invisible, so it is never captioned.
ROTATION_INVISIBLE = ("circle", "ring")
STILL = "stays still"


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class ObjectSpec:
    shape: str
    colour: str
    size: str
    motion: str


@dataclass(frozen=True)
class ClipSpec:
    objects: tuple[ObjectSpec, ...]  # 1 or 2 objects; the second is drawn over the first
    background: str
    background_colour: str


def _check_choice(value, valid, what: str) -> None:
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(map(repr, valid))}")


def check_spec(spec: ClipSpec) -> None:
    """Raise ValueError naming the bad value if `spec` uses a word outside the vocabulary.

    Only the vocabulary is checked: the sampling constraints (distinct colours, no rotating
    circles, ...) hold for sampled specs, but a hand-written prompt may break them and
    still renders.
    """
    if not 1 <= len(spec.objects) <= 2:
        raise ValueError(f"a clip has 1 or 2 objects, got {len(spec.objects)}: {spec!r}")
    for obj in spec.objects:
        _check_choice(obj.shape, SHAPES, "shape")
        _check_choice(obj.colour, tuple(COLOURS), "colour")
        _check_choice(obj.size, SIZES, "size")
        _check_choice(obj.motion, MOTIONS, "motion")
    _check_choice(spec.background, BACKGROUNDS, "background")
    _check_choice(spec.background_colour, tuple(COLOURS), "background colour")


def satisfies_constraints(spec: ClipSpec) -> bool:
    """The rules every sampled spec obeys, so every caption describes a visible, unambiguous clip."""
    objects = spec.objects
    if any(obj.colour == spec.background_colour for obj in objects):
        return False  # the object would vanish into the background
    if any(obj.motion == "rotates" and obj.shape in ROTATION_INVISIBLE for obj in objects):
        return False
    if len(objects) == 2:
        first, second = objects
        if first.colour == second.colour and first.shape == second.shape:
            return False  # "the red square" would not say which one
    return True


# --------------------------------------------------------------------------- captions


def _object_phrase(obj: ObjectSpec, video: bool) -> str:
    phrase = f"a {obj.size} {obj.colour} {obj.shape}"
    return f"{phrase} {obj.motion}" if video else phrase


def _background_phrase(spec: ClipSpec) -> str:
    if spec.background == "plain":
        return f"over a plain {spec.background_colour} background"
    article = "an" if spec.background_colour[0] in "aeiou" else "a"  # "over an orange gradient"
    return f"over {article} {spec.background_colour} {spec.background}"


def caption(spec: ClipSpec, video: bool = True) -> str:
    """The caption of a clip, e.g.
    "a small red square moves left and a large white circle bounces over a blue gradient".

    With video=False (images are single frames) the motion words are dropped.
    """
    check_spec(spec)
    objects = " and ".join(_object_phrase(obj, video) for obj in spec.objects)
    return f"{objects} {_background_phrase(spec)}"


def _alternation(words) -> str:
    # Longest first, so no word is matched by a prefix of another.
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_OBJECT = (
    rf"a (?P<size{{i}}>{_alternation(SIZES)}) (?P<colour{{i}}>{_alternation(COLOURS)}) "
    rf"(?P<shape{{i}}>{_alternation(SHAPES)})(?: (?P<motion{{i}}>{_alternation(MOTIONS)}))?"
)
_BACKGROUND = (
    rf"over an? (?:plain (?P<plain_colour>{_alternation(COLOURS)}) background"
    rf"|(?P<colour>{_alternation(COLOURS)}) (?P<background>gradient|checkerboard))"
)
_CAPTION = re.compile(
    rf"{_OBJECT.format(i=0)}(?: and {_OBJECT.format(i=1)})? {_BACKGROUND}"
)


def vocabulary_text() -> str:
    """Every word of the grammar by kind, as error messages and `cadence prompts` list them."""
    return (f"colours: {', '.join(COLOURS)}; shapes: {', '.join(SHAPES)}; sizes: {', '.join(SIZES)}; "
            f"motions: {', '.join(MOTIONS)}; backgrounds: plain <colour> background, <colour> gradient, "
            "<colour> checkerboard")


# Every word a caption may hold: the vocabulary plus the grammar's own words.
_KNOWN_WORDS = frozenset(
    {"a", "an", "and", "over", "background", *SIZES, *COLOURS, *SHAPES, *BACKGROUNDS}
    | {word for motion in MOTIONS for word in motion.split()}
)
_MISSING_SIZE = re.compile(rf"\ban? (?P<words>(?:{_alternation(COLOURS)}) (?:{_alternation(SHAPES)}))\b")


def _why_unparsable(text: str) -> str:
    """The first thing that keeps `text` out of the grammar, in words a user can act on."""
    words = text.split()
    unknown = list(dict.fromkeys(word for word in words if word not in _KNOWN_WORDS))
    if unknown:
        return f"unknown words {', '.join(map(repr, unknown))}; {vocabulary_text()}"
    missing_size = _MISSING_SIZE.search(text)
    if missing_size:
        return f"missing size word before {missing_size['words']!r}; sizes: {', '.join(map(repr, SIZES))}"
    if " over " not in f" {text} ":
        return ("no background: end with e.g. 'over a plain white background', 'over a blue gradient' "
                "or 'over a red checkerboard'")
    return f"expected e.g. {_EXAMPLES[0]!r} or {_EXAMPLES[1]!r} (one or two objects, then the background)"


def parse_caption(text: str, video: bool | None = None) -> ClipSpec:
    """Invert `caption`, for both the video and the image form (image objects "stay still").

    video=True requires a motion for every object (the video form), video=False none (the
    image form); None takes either. Text outside the grammar raises ValueError naming the
    unknown words, a missing size or background, with the valid words.
    """
    normalized = " ".join(str(text).strip().split())
    match = _CAPTION.fullmatch(normalized)
    if match is None:
        raise ValueError(f"cannot parse caption {text!r}: {_why_unparsable(normalized)}")
    groups = match.groupdict()
    has_second = groups["shape1"] is not None
    if has_second and (groups["motion0"] is None) != (groups["motion1"] is None):
        raise ValueError(f"cannot parse caption {text!r}: either every object has a motion (video) or none (image)")
    has_motion = groups["motion0"] is not None
    if video is not None and has_motion != video:
        need = "a motion for every object" if video else "no motion words"
        raise ValueError(
            f"cannot parse caption {text!r}: a {'video' if video else 'image'} caption has {need}; "
            f"motions: {', '.join(MOTIONS)}; e.g. {_EXAMPLES[0 if video else 2]!r}"
        )
    objects = tuple(
        ObjectSpec(groups[f"shape{i}"], groups[f"colour{i}"], groups[f"size{i}"], groups[f"motion{i}"] or STILL)
        for i in range(2 if has_second else 1)
    )
    if groups["plain_colour"] is not None:
        return ClipSpec(objects, "plain", groups["plain_colour"])
    return ClipSpec(objects, groups["background"], groups["colour"])


_EXAMPLES = (
    "a small green circle moves left over a plain white background",
    "a small red square moves right and a large white ring grows over a blue checkerboard",
    "a large yellow triangle over an orange gradient",
)


def grammar_text() -> str:
    """The caption grammar, the words the reference models know and examples: `cadence prompts`."""
    lines = [
        "Captions of the procedural world (the only prompts the reference models accept):",
        "",
        "  video:  a <size> <colour> <shape> <motion> [and a <size> <colour> <shape> <motion>] over <background>",
        "  image:  a <size> <colour> <shape> [and a <size> <colour> <shape>] over <background>",
        "  background:  a plain <colour> background | a <colour> gradient | a <colour> checkerboard",
        "               ('an' before orange: 'over an orange gradient')",
        "",
        f"  shapes:   {', '.join(SHAPES)}",
        f"  colours:  {', '.join(COLOURS)}",
        f"  sizes:    {', '.join(SIZES)}",
        f"  motions:  {', '.join(MOTIONS)}  (video only; {' and '.join(ROTATION_INVISIBLE)} never rotate)",
        f"  backgrounds: {', '.join(BACKGROUNDS)}",
        "",
        "The models know every word above. They were trained on about 90 % of the (shape, colour, motion)",
        "combinations (ref-video) and 7 in 8 (shape, colour) pairs (ref-image); the rest are held out",
        "(heldout_prompts) and test generalisation. Objects differ in colour from the background; two",
        "objects differ in shape or colour.",
        "",
        "Examples:",
        *(f"  {example}" for example in _EXAMPLES),
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- splits


def _stable_hash(text: str) -> int:
    # sha256, not hash(): Python salts str hashes per process, and the split must never move.
    return int(hashlib.sha256(text.encode()).hexdigest(), 16)


def is_heldout_object(obj: ObjectSpec, video: bool = True) -> bool:
    """About 10 % of (shape, colour, motion) triples (video) or 1 in 8 (shape, colour) pairs (image)."""
    if video:
        return _stable_hash(f"{obj.shape}|{obj.colour}|{obj.motion}") % 10 == 0
    return _stable_hash(f"{obj.shape}|{obj.colour}") % 8 == 0


def is_heldout(spec: ClipSpec, video: bool = True) -> bool:
    """A clip is held out iff any of its objects is a held-out combination."""
    return any(is_heldout_object(obj, video) for obj in spec.objects)


# --------------------------------------------------------------------------- sampling


def _check_video(video) -> None:
    if not isinstance(video, bool):
        raise ValueError(f"video must be True or False, got {video!r}")


def _sample_object(rng: random.Random) -> ObjectSpec:
    shape = rng.choice(SHAPES)
    motions = [m for m in MOTIONS if not (m == "rotates" and shape in ROTATION_INVISIBLE)]
    return ObjectSpec(shape, rng.choice(tuple(COLOURS)), rng.choice(SIZES), rng.choice(motions))


def _sample_spec(rng: random.Random, two_object_fraction: float) -> ClipSpec:
    objects = [_sample_object(rng)]
    if rng.random() < two_object_fraction:
        second = _sample_object(rng)
        while second.colour == objects[0].colour and second.shape == objects[0].shape:
            second = _sample_object(rng)
        objects.append(second)
    used = {obj.colour for obj in objects}
    background_colour = rng.choice([c for c in COLOURS if c not in used])
    return ClipSpec(tuple(objects), rng.choice(BACKGROUNDS), background_colour)


def _spec_stream(seed: int, split: str, video: bool, two_object_fraction: float) -> Iterator[ClipSpec]:
    """Endless specs of one split; rejection sampling keeps the split rule the only filter."""
    rng = random.Random(seed)
    want_heldout = split == "heldout"
    while True:
        spec = _sample_spec(rng, two_object_fraction)
        if is_heldout(spec, video) == want_heldout:
            yield spec


def _check_sampling_args(n, split: str, video, two_object_fraction: float) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    _check_choice(split, SPLITS, "split")
    _check_video(video)
    if not 0.0 <= two_object_fraction <= 1.0:
        raise ValueError(f"two_object_fraction must be in [0, 1], got {two_object_fraction!r}")


def sample_specs(
    n: int, seed: int, split: str = "train", video: bool = True, two_object_fraction: float = 0.3
) -> list[ClipSpec]:
    """n specs of `split`, the same for the same arguments.

    Image specs (video=False) still carry motions: rendered at a random time they vary the
    object's position and scale, while the image caption omits them.
    """
    _check_sampling_args(n, split, video, two_object_fraction)
    stream = _spec_stream(seed, split, video, two_object_fraction)
    return [next(stream) for _ in range(n)]


def _distinct_captions(stream: Iterator[ClipSpec], n: int, video: bool, found: list[str] | None = None) -> list[str]:
    found = list(found or [])
    seen = set(found)
    # Bounded so an impossible request fails instead of spinning forever.
    for _ in range(200 * n + 10_000):
        if len(found) >= n:
            return found
        text = caption(next(stream), video)
        if text not in seen:
            seen.add(text)
            found.append(text)
    if len(found) >= n:
        return found
    raise ValueError(f"could not find n={n} distinct captions (found {len(found)})")


def train_captions(n: int, seed: int = 0, video: bool = True) -> list[str]:
    """n distinct training captions."""
    _check_sampling_args(n, "train", video, 0.3)
    return _distinct_captions(_spec_stream(seed, "train", video, 0.3), n, video)


def _is_simple_demo(spec: ClipSpec, shapes_taken: set[str], video: bool) -> bool:
    if len(spec.objects) != 1:
        return False
    obj = spec.objects[0]
    return obj.shape not in shapes_taken and (not video or obj.motion != STILL)


def heldout_prompts(n: int = 32, seed: int = 1234, video: bool = True) -> list[str]:
    """n distinct held-out captions: the benchmark's default prompt set.

    The first four are single-object clips of four different shapes with a visible motion,
    so a short demo on the first few prompts shows clear cases.
    """
    _check_sampling_args(n, "heldout", video, 0.3)
    simple: list[str] = []
    shapes_taken: set[str] = set()
    for spec in _spec_stream(seed, "heldout", video, two_object_fraction=0.0):
        if len(simple) == min(n, 4):
            break
        if _is_simple_demo(spec, shapes_taken, video):
            shapes_taken.add(spec.objects[0].shape)
            simple.append(caption(spec, video))
    return _distinct_captions(_spec_stream(seed + 1, "heldout", video, 0.3), n, video, found=simple)


# --------------------------------------------------------------------------- rendering

_EDGE_SHARPNESS = 3.0  # sigmoid slope per pixel: the edge ramps 5 % -> 95 % over about 2 px
_TRAVEL = 1.7  # moves left/right/...: centre travel in [-1, 1] units (0.85 of the frame width)
_REACH = 0.9  # travelling centres stay within +-_REACH, so the object stays mostly inside
_STILL_RANGE = 0.45  # centres of objects that do not travel along an axis: +-_STILL_RANGE
_SPEED_JITTER = 0.2
_BOUNCE_FLOOR, _BOUNCE_HEIGHT = 0.55, 1.1  # y grows downwards: the floor is near the bottom
_WHITE_BRIGHTNESS = 0.95
# Background brightness as a fraction of the named colour: a plain background is the colour
# itself (white is white), a gradient ramps up to it and a checkerboard alternates it with a
# dark cell. Dark ends stay bright enough that the colour is still nameable, and every object
# colour stays at least MIN_CONTRAST (of 1) away from every level of every other background colour
# (background_contrast; tests/reference/test_data.py checks all pairs).
_GRADIENT_LOW = 0.3
_CHECKER_DARK = 0.45
MIN_CONTRAST = 0.2  # the closest pair, an orange object on a yellow gradient, differs by 0.21

# Per motion: direction of travel (x, y); y points down as image rows do.
_MOTION_DIRECTION = {
    "moves left": (-1.0, 0.0),
    "moves right": (1.0, 0.0),
    "moves up": (0.0, -1.0),
    "moves down": (0.0, 1.0),
    "moves diagonally": (math.sqrt(0.5), math.sqrt(0.5)),  # signs drawn per clip
}

# Nuisance fields drawn per object slot, in this order (one uniform each).
_OBJ_FIELDS = ("x", "y", "speed", "bounce_phase", "angle", "sign_x", "sign_y")
_BG_FIELDS = ("direction", "cell", "phase_x", "phase_y")


def _sdf(shape: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Signed distance (negative inside) in units of the shape's radius; every shape spans about [-1, 1]."""
    if shape == "circle":
        return torch.sqrt(u * u + v * v) - 1.0
    if shape == "square":
        return torch.maximum(u.abs(), v.abs()) - 0.8
    if shape == "diamond":
        return (u.abs() + v.abs() - 1.1) * math.sqrt(0.5)
    if shape == "triangle":
        # Equilateral, apex up (v < 0), centroid at the origin, inradius 0.55.
        return torch.maximum(v, u.abs() * (math.sqrt(3) / 2) - v * 0.5) - 0.55
    if shape == "cross":
        half_width = 0.33
        bar_x = torch.maximum(u.abs() - 1.0, v.abs() - half_width)
        bar_y = torch.maximum(u.abs() - half_width, v.abs() - 1.0)
        return torch.minimum(bar_x, bar_y)
    if shape == "ring":
        return (torch.sqrt(u * u + v * v) - 0.72).abs() - 0.28
    raise ValueError(f"unknown shape {shape!r}; valid: {', '.join(map(repr, SHAPES))}")


def _lookup(table: dict[str, float | tuple], keys: list[str], device) -> torch.Tensor:
    return torch.tensor([table[k] for k in keys], dtype=torch.float32, device=device)


def _object_path(objs: list[ObjectSpec], noise: dict[str, torch.Tensor], t: torch.Tensor, still_pose: bool = False):
    """Centre, scale and angle of one object slot over time: each (B, T).

    still_pose (images): scale 1 and rotations by whole quarter turns only, so a single
    frame shows the captioned size and shape (a "small" object that grows would pass for a
    large one, a square turned by 45 degrees is a diamond).
    """
    device = t.device
    motions = [o.motion for o in objs]
    direction = _lookup({m: _MOTION_DIRECTION.get(m, (0.0, 0.0)) for m in MOTIONS}, motions, device)  # (B, 2)
    diagonal = torch.tensor([m == "moves diagonally" for m in motions], device=device)
    sign_x = torch.where(diagonal & (noise["sign_x"] < 0.5), -1.0, 1.0)
    sign_y = torch.where(diagonal & (noise["sign_y"] < 0.5), -1.0, 1.0)
    speed = 1.0 + _SPEED_JITTER * (2 * noise["speed"] - 1)  # (B,)

    # Linear travel centred on a start point jittered only as far as the path stays in frame.
    travel = torch.stack([direction[:, 0] * sign_x, direction[:, 1] * sign_y], -1) * (_TRAVEL * speed)[:, None]
    slack = (_REACH - travel.abs() / 2).clamp(0.0, _STILL_RANGE)  # (B, 2)
    mid = (2 * torch.stack([noise["x"], noise["y"]], -1) - 1) * slack
    cx = mid[:, :1] + travel[:, :1] * (t - 0.5)  # (B, T)
    cy = mid[:, 1:] + travel[:, 1:] * (t - 0.5)

    # Two |sin| hops per clip from a floor near the bottom; the phase moves the landings.
    bounces = torch.tensor([m == "bounces" for m in motions], device=device)[:, None]
    hop = (2 * math.pi * t + math.pi * noise["bounce_phase"][:, None]).sin().abs()
    cy = torch.where(bounces, _BOUNCE_FLOOR - _BOUNCE_HEIGHT * hop, cy)

    grows = torch.tensor([m == "grows" for m in motions], device=device)[:, None]
    shrinks = torch.tensor([m == "shrinks" for m in motions], device=device)[:, None]
    scale = torch.where(grows, 0.6 + 0.8 * t, torch.where(shrinks, 1.4 - 0.8 * t, torch.ones_like(t)))
    if still_pose:
        scale = torch.ones_like(t)

    # Only rotating objects get a random start angle: a still square turned by 45 degrees
    # would be a diamond, and its caption would lie.
    rotates = torch.tensor([m == "rotates" for m in motions], device=device)[:, None]
    spin = 2 * math.pi * noise["angle"][:, None] + math.pi * speed[:, None] * t  # about half a turn
    if still_pose:
        spin = (spin / (math.pi / 2)).floor() * (math.pi / 2)
    angle = torch.where(rotates, spin, torch.zeros_like(t))
    return cx, cy, scale, angle


def _object_mask(objs: list[ObjectSpec], noise: dict[str, torch.Tensor], t: torch.Tensor, size: int,
                 still_pose: bool = False) -> torch.Tensor:
    """Soft coverage of one object slot: (B, T, H, W) in [0, 1]."""
    device = t.device
    cx, cy, scale, angle = (a[:, :, None, None] for a in _object_path(objs, noise, t, still_pose))  # (B, T, 1, 1)
    coords = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size * 2 - 1  # pixel centres
    dx = coords[None, None, None, :] - cx  # (B, T, 1, W)
    dy = coords[None, None, :, None] - cy  # (B, T, H, 1)
    radius = _lookup({s: 2 * r for s, r in SIZE_RADIUS.items()}, [o.size for o in objs], device)
    extent = radius[:, None, None, None] * scale  # (B, T, 1, 1): radius in [-1, 1] units
    cos, sin = angle.cos() / extent, angle.sin() / extent
    # Local coordinates (rotated back, radius 1). The grid is separable, so each is one
    # full-size add of two thin tensors.
    u = dx * cos + dy * sin  # (B, T, H, W)
    v = dy * cos - dx * sin

    # Evaluate each shape only on the clips that have it: one SDF's work in total.
    distance = torch.empty_like(u)
    shapes = [o.shape for o in objs]
    for shape in SHAPES:
        rows = [i for i, s in enumerate(shapes) if s == shape]
        if len(rows) == len(shapes):
            distance = _sdf(shape, u, v)
        elif rows:
            rows = torch.tensor(rows, dtype=torch.long, device=device)
            distance.index_copy_(0, rows, _sdf(shape, u.index_select(0, rows), v.index_select(0, rows)))
    # Distance in pixels sets the edge width: about one pixel at any object size.
    return distance.mul_(extent * (-_EDGE_SHARPNESS * size / 2)).sigmoid_()


def _background(specs: list[ClipSpec], noise: dict[str, torch.Tensor], size: int, device) -> torch.Tensor:
    """Static background: (B, 3, 1, H, W) in [0, 1]."""
    coords = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size  # (W,) in (0, 1)
    x, y = coords[None, None, :], coords[None, :, None]  # (1, 1, W), (1, H, 1)

    ramps = torch.stack([x.expand(1, size, size), 1 - x.expand(1, size, size), y.expand(1, size, size), 1 - y.expand(1, size, size)])
    direction = (noise["direction"] * 4).long().clamp(max=3)
    gradient = _GRADIENT_LOW + (1 - _GRADIENT_LOW) * ramps[direction, 0]  # (B, H, W)

    cell = (4 + (noise["cell"] * 5).floor()).clamp(max=8)[:, None, None]  # 4..8 px
    px = torch.arange(size, device=device, dtype=torch.float32)
    col = ((px[None, None, :] + noise["phase_x"][:, None, None] * cell) / cell).floor()
    row = ((px[None, :, None] + noise["phase_y"][:, None, None] * cell) / cell).floor()
    checker = torch.where((col + row) % 2 == 0, 1.0, _CHECKER_DARK)  # (B, H, W)

    kind = torch.tensor([BACKGROUNDS.index(s.background) for s in specs], device=device)[:, None, None]
    level = torch.where(kind == 0, torch.ones_like(gradient), torch.where(kind == 1, gradient, checker))
    colour = _colours([s.background_colour for s in specs], device)  # (B, 3)
    return (colour[:, :, None, None] * level[:, None])[:, :, None]


def _colours(names: list[str], device) -> torch.Tensor:
    rgb = {name: (_WHITE_BRIGHTNESS,) * 3 if name == "white" else value for name, value in COLOURS.items()}
    return _lookup(rgb, names, device)  # (B, 3)


def background_levels(background: str) -> tuple[float, ...]:
    """The brightness levels (fractions of the named colour) a background kind takes."""
    _check_choice(background, BACKGROUNDS, "background")
    return {"plain": (1.0,), "gradient": (_GRADIENT_LOW, 1.0), "checkerboard": (_CHECKER_DARK, 1.0)}[background]


def background_contrast(object_colour: str, background: str, background_colour: str) -> float:
    """Smallest largest-channel difference between an object's colour and any brightness its
    background takes (a gradient passes through every level between its two ends)."""
    rgb = _colours([object_colour, background_colour], "cpu")
    low, high = (min(background_levels(background)), max(background_levels(background)))
    levels = torch.linspace(low, high, 71)[:, None]  # (L, 1)
    return (rgb[0][None] - levels * rgb[1][None]).abs().amax(-1).min().item()


def _draw_noise(n: int, seed: int, device):
    """Per-clip nuisance uniforms from a CPU generator, so a seed means the same on every device."""
    generator = torch.Generator().manual_seed(seed)
    objects = torch.rand(n, 2, len(_OBJ_FIELDS), generator=generator)
    # The second object starts half the jitter range away from the first on both axes, so
    # two objects that stay still rarely sit on top of each other.
    position = [_OBJ_FIELDS.index("x"), _OBJ_FIELDS.index("y")]
    objects[:, 1, position] = (objects[:, 0, position] + 0.5) % 1.0
    background = torch.rand(n, len(_BG_FIELDS), generator=generator)
    slots = [{f: objects[:, k, i].to(device) for i, f in enumerate(_OBJ_FIELDS)} for k in range(2)]
    return slots, {f: background[:, i].to(device) for i, f in enumerate(_BG_FIELDS)}, generator


def _check_render_args(specs, size: int, frames: int = 1) -> None:
    if len(specs) == 0:
        raise ValueError("specs is empty; pass at least one ClipSpec")
    if not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames must be an integer >= 1, got {frames!r}")
    if not isinstance(size, int) or size < 4:
        raise ValueError(f"size must be an integer >= 4, got {size!r}")
    for spec in specs:
        check_spec(spec)


def _render_at(specs: list[ClipSpec], t: torch.Tensor, size: int, slots, background_noise,
               still_pose: bool = False) -> torch.Tensor:
    """Frames of each clip at times t (B, T) in [0, 1] -> (B, 3, T, H, W) in [-1, 1]."""
    device = t.device
    frames = _background(specs, background_noise, size, device).expand(-1, -1, t.shape[1], -1, -1).contiguous()
    for k in range(2):  # the second object is drawn over the first
        # Only the clips that have object k pay for drawing it.
        rows = [i for i, s in enumerate(specs) if len(s.objects) > k]
        if not rows:
            break
        objs = [specs[i].objects[k] for i in rows]
        index = torch.tensor(rows, dtype=torch.long, device=device)
        noise = {name: value.index_select(0, index) for name, value in slots[k].items()}
        coverage = _object_mask(objs, noise, t.index_select(0, index), size, still_pose)[:, None]  # (b, 1, T, H, W)
        colour = _colours([o.colour for o in objs], device)[:, :, None, None, None]  # (b, 3, 1, 1, 1)
        if len(rows) == len(specs):
            frames = torch.lerp(frames, colour, coverage)
        else:
            frames.index_copy_(0, index, torch.lerp(frames.index_select(0, index), colour, coverage))
    return frames.mul_(2).sub_(1)


def render(specs: list[ClipSpec], frames: int = 16, size: int = 32, seed: int = 0, device="cpu") -> torch.Tensor:
    """Clips of `specs`: (B, 3, T, H, W) float32 in [-1, 1]; the same (specs, seed) gives the same tensor."""
    _check_render_args(specs, size, frames)
    slots, background_noise, _ = _draw_noise(len(specs), seed, device)
    t = torch.linspace(0.0, 1.0, frames, device=device)[None].expand(len(specs), -1)  # (B, T)
    return _render_at(specs, t, size, slots, background_noise)


def render_images(specs: list[ClipSpec], size: int = 32, seed: int = 0, device="cpu") -> torch.Tensor:
    """One frame of each clip at a random time: (B, 3, H, W) float32 in [-1, 1].

    The nuisance draws match `render` with the same seed; the random time varies the
    position between otherwise static images. The object is drawn at its captioned size and
    turned by whole quarter turns only (still_pose), since an image caption has no motion to
    explain a grown object or a square turned into a diamond.
    """
    _check_render_args(specs, size)
    slots, background_noise, generator = _draw_noise(len(specs), seed, device)
    t = torch.rand(len(specs), 1, generator=generator).to(device)  # (B, 1)
    return _render_at(specs, t, size, slots, background_noise, still_pose=True)[:, :, 0]
