"""What a request may ask, checked before it is queued.

Every refusal is a :class:`RequestError` carrying its HTTP status and one message naming the
bad value and the valid ones; the checks are cadence's own (``cadence.generation``'s limits
on steps and sizes, ``Recipe.parse``), so a request is refused for the same reasons and in the
same words as ``cadence generate``. Nothing here runs a model: a refused request never
reaches the device.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, ValidationError

from cadence import generation
from cadence.recipe import BASELINE, Recipe
from cadence.serve.jobs import Job, new_id
from cadence.serve.pipelines import ServedModel
from cadence.serve.settings import ServeSettings

DEFAULT = "default"  # the recipe of the model's family (``cadence recipes --model FAMILY``)
RESPONSE_FORMATS = ("b64_json", "url")


class RequestError(ValueError):
    def __init__(self, message: str, status: int = 422, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None  # default: the first model served
    prompt: str
    recipe: str = DEFAULT
    steps: int | None = None
    seed: int = 0
    guidance_scale: float | None = None
    size: str | None = None  # OpenAI's "WIDTHxHEIGHT"
    height: int | None = None
    width: int | None = None


class VideoRequest(_Request):
    frames: int | None = None
    compare_baseline: bool = False  # also run the unaccelerated model: side by side, PSNR, speedup


class ImageRequest(_Request):
    n: int = 1
    response_format: str = "b64_json"
    compare_baseline: bool = False


def parse(kind: type[_Request], body) -> _Request:
    """A decoded JSON body -> the request, or the first thing wrong with it, in words."""
    if not isinstance(body, dict):
        raise RequestError(f"the body must be a JSON object, got {type(body).__name__}: {str(body)[:80]!r}")
    try:
        return kind.model_validate(body)
    except ValidationError as error:
        raise RequestError(_first_error(kind, error)) from None


def _first_error(kind: type[_Request], error: ValidationError) -> str:
    first = error.errors()[0]
    name = ".".join(str(part) for part in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"unknown field {name!r}; valid: {', '.join(kind.model_fields)}"
    if first["type"] == "missing":
        return f"field {name!r} is required"
    return f"{name}={first.get('input')!r}: {first['msg'].lower()}"


def _size(request: _Request, settings: ServeSettings) -> tuple[int | None, int | None]:
    height, width = request.height, request.width
    if request.size is not None:
        match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", request.size)
        if not match:
            raise RequestError(f"size={request.size!r} must be WIDTHxHEIGHT, e.g. '832x480'", param="size")
        width, height = int(match.group(1)), int(match.group(2))
        if request.height is not None or request.width is not None:
            raise RequestError("give size or height and width, not both", param="size")
    for name, value in (("height", height), ("width", width)):
        if value is not None and value > settings.max_side:
            raise RequestError(f"{name}={value} is over this server's limit of {settings.max_side} pixels", param=name)
    return height, width


def _recipe(text: str, model: ServedModel) -> str:
    if text.strip() == DEFAULT:
        if model.default_recipe is None:
            raise RequestError(f"model {model.name!r} has no family default recipe; name one, or '{BASELINE}'",
                               param="recipe")
        return model.default_recipe
    if text.strip().endswith(".toml"):
        # Recipe.parse would read that file on the server's disk.
        raise RequestError(f"recipe={text!r}: a server takes recipe strings, not files; e.g. "
                           f"'fixed-interval(interval=2)', '{DEFAULT}' or '{BASELINE}'", param="recipe")
    try:
        return str(Recipe.parse(text))
    except (ValueError, TypeError) as error:
        raise RequestError(f"recipe={text!r}: {error}", param="recipe") from None


def check(request: _Request, models: dict[str, ServedModel], settings: ServeSettings, kind: str) -> Job:
    """A request -> the job to queue, or the :class:`RequestError` that refuses it."""
    name = request.model or next(iter(models))
    if name not in models:
        raise RequestError(f"unknown model {name!r}; valid: {', '.join(models)}", param="model")
    model = models[name]
    if model.task != kind:
        others = [served for served, entry in models.items() if entry.task == kind]
        where = "/v1/videos" if model.task == "video" else "/v1/images/generations"
        raise RequestError(f"model {name!r} makes {model.task}s: ask {where}; {kind} models served here: "
                           f"{', '.join(others) or 'none'}", param="model")
    prompt = request.prompt
    if not prompt.strip():
        raise RequestError("prompt is empty: give a caption, e.g. 'a small red square moves left over a blue "
                           "gradient'", param="prompt")
    if len(prompt) > settings.max_prompt_chars:
        raise RequestError(f"prompt has {len(prompt)} characters, over this server's limit of "
                           f"{settings.max_prompt_chars}", param="prompt")
    check_captions = getattr(model.pipe, "check_captions", None)  # the reference models' world grammar
    if check_captions is not None:
        try:
            check_captions([prompt])
        except ValueError as error:
            raise RequestError(str(error), param="prompt") from None
    if isinstance(request, ImageRequest):
        if request.n != 1:
            raise RequestError(f"n={request.n}: this server makes one image per request; valid: 1", param="n")
        if request.response_format not in RESPONSE_FORMATS:
            raise RequestError(f"response_format={request.response_format!r}; valid: {', '.join(RESPONSE_FORMATS)}",
                               param="response_format")
    frames = getattr(request, "frames", None)
    if frames is not None and frames > settings.max_frames:
        raise RequestError(f"frames={frames} is over this server's limit of {settings.max_frames}", param="frames")
    height, width = _size(request, settings)
    steps = settings.steps if request.steps is None else request.steps
    guidance_scale = settings.guidance_scale if request.guidance_scale is None else request.guidance_scale
    recipe = _recipe(request.recipe, model)
    checks = (("steps", lambda: generation.check_count(
                  "steps", steps, min(settings.max_steps, generation.step_limit(model.pipe)),
                  why=" (this server's max_steps and the scheduler's timesteps)")),
              ("seed", lambda: generation.check_seed(request.seed)),
              ("guidance_scale", lambda: generation.check_guidance_scale(guidance_scale)))
    for param, run_check in checks:
        try:
            run_check()
        except ValueError as error:
            raise RequestError(str(error), param=param) from None
    try:
        size = generation.resolve_size(model.pipe, height, width, frames)
    except ValueError as error:
        raise RequestError(str(error), param="size") from None
    return Job(id=new_id(), kind=kind, model=name, prompt=prompt, recipe=recipe, steps=steps, seed=request.seed,
               guidance_scale=float(guidance_scale), height=size.height, width=size.width, frames=size.frames,
               compare_baseline=request.compare_baseline, measured=model.measured(recipe))
