"""``cadence.load``: a reference model by name, or a local diffusers checkpoint directory.

Before any weight is read, the directory is checked: safetensors only (pickle-based formats
can run code when loaded), every config readable JSON, every safetensors file whole. After
loading, every floating-point weight is checked finite: a NaN weight otherwise loads
silently and turns every output NaN. Each refusal is one ``ValueError`` naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cadence.reference.models import REFERENCE_MODELS, STUDENTS, reference_model

# Pickle-based formats can run arbitrary code when loaded: cadence refuses them.
UNSAFE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def load(name_or_path: str, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
         text_encoder: bool = True):
    """``load("ref-video")``, ``load("ref-image")``, a shipped student (``load("ref-video-4step")``)
    or ``load("/path/to/diffusers/checkpoint")``."""
    if name_or_path in REFERENCE_MODELS:
        pipe = load_reference(name_or_path, text_encoder=text_encoder)
        check_finite_weights(pipe, reference_weights(name_or_path).parent)
    else:
        path = STUDENTS.get(name_or_path) or Path(name_or_path)
        if name_or_path in STUDENTS and not path.is_dir():
            raise ValueError(f"{name_or_path!r} is registered but not shipped yet (no {path}): benchmarks/README.md "
                             "gives the cadence distill command that trains it")
        if not path.is_dir():
            raise ValueError(
                f"unknown model {name_or_path!r}; valid: {', '.join([*REFERENCE_MODELS, *STUDENTS])}, "
                "or a local diffusers checkpoint directory (with model_index.json)"
            )
        pipe = load_pipeline_dir(path)
        check_finite_weights(pipe, path)
        if (path / STUDENT_FILE).is_file():
            open_student(pipe, path, text_encoder)
    if device is not None or dtype is not None:
        pipe.to(device=device, dtype=dtype)
    return pipe


STUDENT_FILE = "student.json"  # written by cadence.distill beside a few-step student's components


def student_record(name_or_path) -> dict | None:
    """The ``student.json`` of a few-step student, by shipped name or folder (the one reader of
    it); None for anything else, a registered student not shipped yet included."""
    path = Path(STUDENTS.get(str(name_or_path), name_or_path)) / STUDENT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def reference_of(name: str):
    """The reference model ``name`` is, or the teacher of the student ``name`` (whose held-out
    captions it is judged on): a ``ReferenceModel``, or None for anything else."""
    if name in REFERENCE_MODELS:
        return REFERENCE_MODELS[name]
    return REFERENCE_MODELS.get((student_record(name) or {}).get("teacher"))


def open_student(pipe, path: Path, text_encoder: bool = True) -> None:
    """A few-step student (``cadence.distill``) runs its own schedule by default: its steps and
    sigmas, guidance 1 (``pipeline.sampling_defaults``). Its weights are stored in bf16 and run in
    float32, as ``load_reference`` runs the teachers; a student of a reference model gets the text
    encoder its teacher has."""
    from cadence.reference.pipelines import _RefPipeline

    record = student_record(path)
    steps, sigmas = record.get("steps"), record.get("sigmas")
    users = ("WanPipeline", "FluxPipeline")  # a student of a user's checkpoint (cadence.distill.user)
    if not isinstance(pipe, _RefPipeline) and type(pipe).__name__ not in users:
        raise ValueError(
            f"{path / STUDENT_FILE}: a student of a {type(pipe).__name__}; cadence opens students of "
            f"RefVideoPipeline, RefImagePipeline, {', '.join(users)} only")
    if not isinstance(steps, int) or steps < 1 or not isinstance(sigmas, list) or len(sigmas) != steps:
        raise ValueError(f"{path / STUDENT_FILE}: steps={steps!r} and sigmas={sigmas!r} must be a positive step "
                         "count and one sigma per step; the checkpoint is damaged")
    shift = pipe.scheduler.config.get("shift", 1.0)
    if shift != 1.0 or pipe.scheduler.config.get("use_dynamic_shifting"):
        # set_timesteps(sigmas=...) shifts what it is given: the stored sigmas are already shifted.
        raise ValueError(f"{path}: a student's scheduler must have shift 1.0 (its sigmas are stored shifted), "
                         f"this one has shift={shift}")
    pipe.student = {"steps": steps, "sigmas": [float(s) for s in sigmas],
                    "guidance_scale": float(record.get("guidance_scale", 1.0))}
    if record.get("causal"):  # a stream student (cadence distill --method self-forcing): the chunk it was trained on
        pipe.student["chunk_frames"] = int(record["chunk_frames"])
        pipe.student["frames"] = int(record["size"]["frames"])  # the clip it was trained on: positions 0..frames-1
    pipe.transformer.float()
    if not isinstance(pipe, _RefPipeline):
        _open_user_student(pipe)
        return
    if text_encoder and pipe.text_encoder is None and record.get("teacher") in REFERENCE_MODELS:
        from cadence.reference.text import load_text_encoder

        tokenizer, encoder = load_text_encoder()
        pipe.register_modules(tokenizer=tokenizer, text_encoder=encoder)


def _open_user_student(pipe) -> None:
    """A diffusers pipeline sets its scheduler's timesteps itself: its scheduler becomes one that
    runs the student's sigmas at K steps (``StudentScheduler``); ``cadence.generation.sampling``
    reads the student's steps and guidance from ``pipe.student``."""
    from cadence.distill.user import StudentScheduler

    pipe.scheduler = StudentScheduler.of(pipe.scheduler.config, pipe.student["sigmas"])


def check_safetensors_only(path: Path) -> None:
    unsafe = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.suffix in UNSAFE_WEIGHTS)
    if unsafe:
        raise ValueError(
            f"checkpoint {str(path)!r} holds non-safetensors weights ({', '.join(unsafe[:3])}): cadence loads "
            "safetensors only, since pickle-based files can run code when loaded; convert them to .safetensors"
        )


# safetensors' header errors, in words: what is wrong with the file.
_DAMAGE = {
    "incomplete metadata": "truncated: its header describes more data than the file holds",
    "header too large": "its header is damaged (or it is not a safetensors file)",
    "header too small": "too short to be a safetensors file (empty or truncated)",
    "invalid": "its header is not valid safetensors metadata",
}


def check_files(path: Path) -> None:
    """Every config a readable JSON file, every safetensors file whole (its header read and
    checked against the file's length: no tensor is loaded)."""
    from safetensors import safe_open

    for config in sorted(path.rglob("*.json")):
        try:
            json.loads(config.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{config}: not valid JSON ({error}); the checkpoint is damaged") from None
    for weights in sorted(path.rglob("*.safetensors")):
        with open(weights, "rb") as f:
            start = f.read(64)
        if start.startswith(b"version https://git-lfs"):
            raise ValueError(f"{weights}: a Git LFS pointer, not the weights; fetch them (git lfs pull)")
        try:
            with safe_open(str(weights), "pt"):
                pass
        except Exception as error:  # safetensors raises its own SafetensorError, or OSError
            reason = str(error).removeprefix("Error while deserializing header: ")
            words = next((text for key, text in _DAMAGE.items() if key in reason.lower()), reason)
            raise ValueError(f"{weights}: not a readable safetensors file, {words}; re-save or re-download it") from None


def load_pipeline_dir(path: Path):
    from diffusers import DiffusionPipeline

    from cadence.reference.pipelines import RefImagePipeline, RefVideoPipeline

    index = path / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{str(path)!r} is not a diffusers pipeline directory: it has no model_index.json")
    check_safetensors_only(path)
    check_files(path)
    class_name = json.loads(index.read_text()).get("_class_name")
    ours = {"RefVideoPipeline": RefVideoPipeline, "RefImagePipeline": RefImagePipeline}
    pipeline_cls = ours.get(class_name, DiffusionPipeline)
    try:
        return pipeline_cls.from_pretrained(str(path), use_safetensors=True, **_packed_transformer(path))
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError, ImportError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(f"{path}: diffusers cannot load it as a {class_name or 'pipeline'} "
                         f"({type(error).__name__}: {first})") from None


def _packed_transformer(path: Path) -> dict:
    """``{"transformer": model}`` for a pipeline folder whose transformer weights are packed
    (:func:`unpacked`: a shipped student), loaded from their unpacked copy; ``{}`` otherwise."""
    folder = path / "transformer"
    weights = unpacked(folder) if folder.is_dir() else None
    if weights is None or weights == folder.resolve():
        return {}
    import diffusers

    class_name = json.loads((folder / "config.json").read_text()).get("_class_name")
    model_cls = getattr(diffusers, str(class_name), None)
    if model_cls is None:
        raise ValueError(f"{folder / 'config.json'}: _class_name {class_name!r} is not a diffusers model class")
    check_files(weights)
    return {"transformer": model_cls.from_pretrained(str(weights), use_safetensors=True)}


def reference_weights(name: str) -> Path:
    """A reference model's transformer folder, its packed weights unpacked (:func:`transformer_folder`)."""
    return transformer_folder(reference_model(name).checkpoint)


def transformer_folder(checkpoint: Path) -> Path:
    """A checkpoint's ``transformer/`` folder, readable by ``from_pretrained`` (:func:`unpacked`).
    Calibrations stay with the checkpoint: ``load_reference`` points the model at this folder,
    not at the cache."""
    return unpacked(Path(checkpoint) / "transformer")


DELTA = ".delta.xz"  # a student's weights as their difference from its teacher's (:func:`pack_delta`)


def unpacked(folder: Path) -> Path:
    """``folder`` with its xz-compressed weights (``*.safetensors.xz``) unpacked: ref-video's
    17.5 MiB of weights are 12.2 MiB packed, ref-dllm's 9.8 MiB are 7.0 MiB, and what travels
    to the GPU machine, the tracked tree included, is at most 64 MiB. A student's weights may be
    packed as their difference from its teacher's (``*.safetensors.delta.xz``, :func:`pack_delta`:
    ref-video-4step's 17.5 MiB are 5.9 MiB so). They are unpacked once into the cache with the
    folder's JSON (configs, tokenizer) beside them, keyed by the folder's place and its files'
    names, sizes and times, and for a packed difference its teacher's weight files' too (on a
    cache hit no weights are read: a difference's few-kB header says its teacher). Several processes may unpack at once
    (torchrun's ranks): each into its own folder, and the first to finish is the one kept.
    Unpacked weights in the folder (a fresh ``cadence train``) win over packed ones."""
    import hashlib
    import lzma
    import os
    import shutil

    folder = Path(folder).resolve()
    packed = sorted([*folder.glob("*.safetensors.xz"), *folder.glob(f"*.safetensors{DELTA}")])
    if not packed or any(folder.glob("*.safetensors")):
        return folder
    files = (*packed, *sorted(folder.glob("*.json")))
    stamp = hashlib.sha256(str(folder).encode())
    for path in files:
        stat = path.stat()
        stamp.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    for path in _delta_bases(packed):  # other teacher weights: unpacked again, and so refused by the digest
        stat = path.stat()
        stamp.update(f"base:{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    cache = Path(os.environ.get("CADENCE_CACHE", Path.home() / ".cache" / "cadence"))
    target = cache / "checkpoints" / f"{folder.parent.name}-{folder.name}-{stamp.hexdigest()[:16]}"
    if (target / "config.json").is_file():
        return target
    partial = target.with_name(f"{target.name}.{os.getpid()}.partial")  # never read before it is whole
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        for path in files:
            if path.name.endswith(DELTA):
                _undo_delta(path, partial / path.name.removesuffix(DELTA))
            elif path.suffix == ".xz":
                with lzma.open(path) as source, open(partial / path.stem, "wb") as out:
                    shutil.copyfileobj(source, out, length=2**22)
            else:
                shutil.copy2(path, partial / path.name)
    except BaseException:  # a refused or interrupted unpack leaves nothing behind
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if target.exists() and not (target / "config.json").is_file():
        shutil.rmtree(target, ignore_errors=True)  # a damaged copy, not one being written (those are partial)
    try:
        os.replace(partial, target)
    except OSError:  # another process finished first: its copy is the same
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.int16)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        state.update(load_file(path))
    return state


def _digest(state: dict[str, torch.Tensor]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def pack_delta(student: Path, out: Path, base: str) -> None:
    """Write ``student``'s bf16 weights (a folder of ``*.safetensors``) to ``out`` (one
    ``.safetensors.delta.xz`` file) as the difference of their bits from the bf16 weights of the
    reference model ``base``, modulo 2**16: a few-step student moves little from its teacher, so
    the differences are small integers that xz packs to a third of the weights (ref-video-4step:
    5.9 of 17.5 MiB, where xz of the weights themselves keeps 12.2; both at preset 9). Exact:
    :func:`unpacked` adds them back bit for bit, and refuses a base whose weights are not the ones
    packed against (a digest in the metadata)."""
    import lzma

    from safetensors.torch import save

    weights, teacher = _weights(Path(student)), _weights(reference_weights(base))
    wrong = sorted(name for name, tensor in weights.items()
                   if tensor.dtype != torch.bfloat16 or name not in teacher or teacher[name].shape != tensor.shape
                   or teacher[name].dtype != torch.bfloat16)
    if wrong or not weights:
        raise ValueError(f"{student}: cannot pack as a difference from {base}: {len(wrong)} weight(s) are not bf16 "
                         f"tensors of the teacher's shape and dtype (first: {wrong[:3]}), or there are none")
    delta = {name: _bits(tensor) - _bits(teacher[name]) for name, tensor in weights.items()}  # wraps in int16
    Path(out).write_bytes(lzma.compress(save(delta, metadata={"base": base, "base_digest": _digest(teacher)}),
                                        preset=9))


def _delta_meta(stream) -> dict:
    """The safetensors metadata of a packed difference: the format's own JSON header, read from
    the start of its (decompressed) stream, a few kB."""
    size = int.from_bytes(stream.read(8), "little")
    return json.loads(stream.read(size)).get("__metadata__") or {}


def _delta_bases(packed: list[Path]) -> list[Path]:
    """The teacher weight files the packed differences among ``packed`` were made against."""
    import lzma

    bases = []
    for path in packed:
        if path.name.endswith(DELTA):
            with lzma.open(path) as stream:
                base = _delta_meta(stream).get("base")
            if base in REFERENCE_MODELS:
                bases.extend(sorted(reference_weights(base).glob("*.safetensors")))
    return bases


def _undo_delta(path: Path, out: Path) -> None:
    import io
    import lzma

    from safetensors.torch import load, save_file

    data = lzma.decompress(path.read_bytes())
    meta = _delta_meta(io.BytesIO(data))
    base = meta.get("base")
    if base not in REFERENCE_MODELS:
        raise ValueError(f"{path}: a packed difference from {base!r}, not a reference model; the checkpoint is damaged")
    teacher = _weights(reference_weights(base))
    if _digest(teacher) != meta.get("base_digest"):
        raise ValueError(f"{path}: packed against other {base} weights than the shipped ones (digest mismatch); "
                         "it cannot be unpacked exactly")
    save_file({name: (_bits(teacher[name]) + d).view(torch.bfloat16) for name, d in load(data).items()}, out)


def load_reference(name: str, text_encoder: bool = True):
    model = reference_model(name)
    weights = reference_weights(name)
    if not (weights / "config.json").is_file():
        raise FileNotFoundError(
            f"{name} has no trained checkpoint at {weights}; train one with `cadence train --model {name}`"
        )
    check_safetensors_only(weights.parent)
    check_files(weights.parent)
    transformer = model.transformer_cls.from_pretrained(str(weights), use_safetensors=True, torch_dtype=torch.float32)
    # calibrations are read from and written beside the checkpoint, also when its weights were unpacked into the cache
    transformer.register_to_config(_name_or_path=str(model.checkpoint / "transformer"))
    tokenizer = encoder = None
    if text_encoder:
        from cadence.reference.text import load_text_encoder

        tokenizer, encoder = load_text_encoder()
    return model.pipeline_cls(transformer=transformer, scheduler=model.scheduler(), text_encoder=encoder, tokenizer=tokenizer,
                              sample_size=model.sample)


def _non_finite(tensor: torch.Tensor) -> int:
    """How many of ``tensor``'s values are NaN or Inf. A float32 sum is one pass with no copy
    and is finite whenever every value is; only a non-finite sum (or an overflowing one) is
    looked at element by element."""
    if not tensor.is_floating_point() or tensor.device.type == "meta" or tensor.numel() == 0:
        return 0
    if torch.isfinite(tensor.sum(dtype=torch.float32)):
        return 0
    return int((~torch.isfinite(tensor)).sum())


def _file_holding(directory: Path, key: str) -> Path | None:
    from safetensors import safe_open

    for weights in sorted(directory.glob("*.safetensors")):
        with safe_open(str(weights), "pt") as f:
            if key in f.keys():
                return weights
    return None


def check_finite_weights(pipe, path: Path) -> None:
    """Refuse a pipeline with a NaN or Inf weight, naming the file and the parameter."""
    with torch.no_grad():
        for component, module in pipe.components.items():
            if not isinstance(module, torch.nn.Module):
                continue
            tensors = [*module.named_parameters(), *module.named_buffers()]
            for name, tensor in tensors:
                bad = _non_finite(tensor)
                if bad:
                    where = _file_holding(path / component, name) or path / component
                    raise ValueError(
                        f"{where}: weight {name!r} of the {component} holds {bad} NaN or Inf value(s) of "
                        f"{tensor.numel()}; every output would be NaN: the checkpoint is damaged, re-save or "
                        "re-download it"
                    )
