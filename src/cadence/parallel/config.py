"""ParallelConfig: how one generation is spread over several GPUs (or CPU processes).

Three degrees multiply to the number of processes (``torchrun --nproc-per-node``):

- ``ulysses``: DeepSpeed-Ulysses sequence parallelism. Each rank holds a slice of the tokens
  between attention calls; an all-to-all before attention gives each rank *all* tokens of
  ``heads / ulysses`` heads, and one after gives the slices back. Every attention technique
  runs unchanged on each rank's heads: a sparse pattern sees the whole token layout.
- ``ring``: Ring attention. Each rank keeps its slice of the queries and sees the others'
  keys and values chunk by chunk, merging the partial outputs by their log-sum-exp. No rank
  ever holds the whole layout, so sparse patterns and cadence's attention backends are
  refused under it; it needs a kernel that returns the log-sum-exp (cuDNN, on a GPU).
- ``cfg``: CFG parallelism. With ``cfg=2`` the conditional and unconditional forwards of a
  step run at the same time on two halves of the ranks, which exchange their outputs.

``ulysses`` and ``ring`` run on diffusers' context-parallel hooks (``ContextParallelConfig``,
the model's ``_cp_plan``); ``cfg`` is cadence's own (diffusers 0.42 has none).

``vae`` (off by default) adds no degree: the VAE decode after the denoising loop is split
into horizontal bands over *all* the ranks (``parallel/vae.py``), each decoded with
``vae_halo`` latent rows of context on its inner edges, and gathered on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

DEGREES = ("ulysses", "ring", "cfg")
OPTIONS = ("vae", "vae_halo")
SWITCH = {"1": True, "true": True, "on": True, "0": False, "false": False, "off": False}
# 8 latent rows: the seam error measured small with random weights (benchmarks/RESULTS.md);
# parallel/vae.py's exact_halo (15 for Wan 2.1) decodes as one process does, at more duplicated rows
DEFAULT_VAE_HALO = 8


@dataclass(frozen=True)
class ParallelConfig:
    ulysses: int = 1
    ring: int = 1
    cfg: int = 1
    vae: bool = False
    vae_halo: int = DEFAULT_VAE_HALO

    def __post_init__(self) -> None:
        for name in DEGREES:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"parallel {name}={value!r} must be a positive integer")
        if self.cfg not in (1, 2):
            raise ValueError(f"parallel cfg={self.cfg} must be 1 or 2: classifier-free guidance has two branches")
        if not isinstance(self.vae, bool):  # a ValueError like every refusal here, not TypeError
            raise ValueError(f"parallel vae={self.vae!r} must be True or False (vae=1 or vae=0)")  # noqa: TRY004
        if not isinstance(self.vae_halo, int) or isinstance(self.vae_halo, bool) or self.vae_halo < 0:
            raise ValueError(f"parallel vae_halo={self.vae_halo!r} must be an integer >= 0 (latent rows)")
        if self.vae_halo != DEFAULT_VAE_HALO and not self.vae:
            raise ValueError(f"parallel vae_halo={self.vae_halo} is set but vae is off; add vae=1")

    @property
    def sequence(self) -> int:
        """Ranks that share one forward's tokens (Ulysses x Ring)."""
        return self.ulysses * self.ring

    @property
    def world(self) -> int:
        """Processes the configuration needs."""
        return self.sequence * self.cfg

    def __str__(self) -> str:
        shown = DEGREES + (OPTIONS if self.vae else ())  # vae off: printed as before it existed
        return ", ".join(f"{f.name}={int(getattr(self, f.name))}" for f in fields(self) if f.name in shown)

    @classmethod
    def parse(cls, text: str) -> ParallelConfig:
        """``"ulysses=2, cfg=2, vae=1"`` (the CLI's ``--parallel``); degrees left out are 1,
        options left out their defaults."""
        values: dict = {}
        for term in filter(str.strip, text.split(",")):
            name, equals, value = (part.strip() for part in term.partition("="))
            if not equals or name not in DEGREES + OPTIONS:
                raise ValueError(f"--parallel term {term.strip()!r}: expected name=value with name one of "
                                 f"{', '.join(DEGREES + OPTIONS)}, e.g. 'ulysses=2, cfg=2, vae=1'")
            if name == "vae":
                if value.lower() not in SWITCH:
                    raise ValueError(f"--parallel vae={value!r} must be one of {', '.join(SWITCH)}")
                values[name] = SWITCH[value.lower()]
                continue
            if name == "vae_halo":
                if not value.isdigit():
                    raise ValueError(f"--parallel vae_halo={value!r} must be an integer >= 0 (latent rows)")
                values[name] = int(value)
                continue
            if not value.isdigit():
                raise ValueError(f"--parallel {name}={value!r} must be a positive integer")
            values[name] = int(value)
        if not values:
            raise ValueError(f"--parallel {text!r} names no degree; e.g. 'ulysses=2, cfg=2'")
        return cls(**values)
