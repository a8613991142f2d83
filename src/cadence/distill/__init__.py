"""Few-step students (issue 17): ``distill(teacher, out, steps=4, method="dmd" or "consistency")``;
causal streaming students (issue 18): ``method="self-forcing"`` with ``chunk_frames``.

- ``student.py``: the student's schedule and the reference transformers in their latent layout;
- ``ode_pairs.py``: ODE-pair regression on the teacher's CFG trajectories (initialisation);
- ``dmd.py``: DMD2's distribution-matching generator loss, its critic, backward simulation;
- ``consistency.py``: consistency distillation (CD / LCM) on the teacher's CFG ODE, its EMA target;
- ``causal.py``: the stream's block-causal model as one masked full-sequence forward (no KV cache);
- ``self_forcing.py``: per-chunk ODE regression and Self-Forcing's rollouts for a causal student;
- ``trainer.py``: the time-budgeted, resumable run; ``state.py``: its state on disk;
- ``report.py``: loss curves, sample grid, card; ``cli.py``: ``cadence distill``.
"""

from cadence.distill.trainer import METHODS, Conditions, DistillSettings, distill

__all__ = ["METHODS", "Conditions", "DistillSettings", "distill"]
