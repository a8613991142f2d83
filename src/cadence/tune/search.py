"""``tune``: the fastest recipe that meets a quality bar, searched on the user's pipeline.

An Optuna study (TPE sampler, quality bars as its constraints) proposes compositions of the
registered techniques (``space.SearchSpace``); each candidate runs on the tuning cases
(prompt x seed) against the unaccelerated output, and its objective is its time relative to
the baseline timed beside it. Three things keep a slow or poor candidate from costing much:

- the cost model (``cost.CostModel``) skips one that cannot beat the best found;
- a candidate's generation is stopped once it runs twice as long as the best found's (or,
  before one is found, twice the baseline's), or longer than the time budget leaves; one
  whose median generation takes longer than the best found's (or the baseline's) is rejected;
- after each case the shortfall of its mean PSNR from the bar is reported as the trial's
  intermediate value, and Optuna's ``ThresholdPruner`` rejects it once the first cases miss
  the bar by more than the measure's margin (``quality.PSNR_MARGIN_DB``). (The shortfall,
  not the PSNR itself, because the sampler ranks pruned trials by their last intermediate
  value in the study's direction, here minimize.)

The search's figures choose nothing by themselves: of many candidates measured on a few
cases, the one that looks best is also the luckiest, on quality and on time. So the fastest
candidates that meet the bars are run again, ``CONFIRMED_AT_ONCE`` at a time, on
confirmation cases the search never saw (``prompts.PromptSplit.confirm_cases``), each case's
baseline timed just before them (``check.compare``); the fastest there that still meets
every bar (the bar itself, no margin) and is faster than the baseline is chosen, and the
next ones are confirmed while none does and time is left. The held-out check then runs the chosen recipe on other cases again.

With ``speed_at`` (``--speed-at wan2.1-1.3b``) a candidate's time is not the one measured on
the tuned model but its time modelled at that real size (``realsize``: the per-step time of
its per-forward techniques measured there, times the share of the block work its step policy
computes on the tuned model's cases, over the unaccelerated per-step time; the reused
forwards' own cost is left out). The tuned model's times say nothing about the real size, so
its two timing rules (a generation stopped at ``STOP_FACTOR`` times the best's, a candidate
rejected past ``SLOW_MARGIN``) are off; one whose modelled time is more than
``MODELLED_MARGIN`` slower than the best found's is rejected instead, before its cases run
when its per-forward part is measured: its modelled time is then at least the part's ratio
times the least share of the block work its step policy computes (``least_share``: 1 without
one), so a part slower than the baseline sinks every candidate that holds it at any budget
but a small one, without a measure. The cost model learns the modelled times; the
confirmation and the held-out check judge quality on the tuned model and speed by the
modelled time, the shipped default's included. A new per-forward part is measured only where
a measure of the typical length so far (the median: one slow part must not stop the search,
issue 22) fits in what the budget leaves after the reserve (else the candidate is rejected
as out of time); a measure that then runs longer is stopped where that time ends (in the
confirmation and the check, where the budget ends), a confirmation round after the first
runs only where its new measures fit, and no closing baseline runs after a candidate's cases
(its time would be unused).

The study starts from the shipped default (``seeds``): the default, each of its techniques
alone, then its step policy at ``BUDGET_LADDER`` larger budgets with its per-forward part (the
budget is the knob that decides quality; issue 22's run never reached the budgets where the
default met the bar), then those ladder recipes again with the device's native low-precision
linears (``space.native_linear_format``: fp8 on Ada and Hopper, int8 on older GPUs, none on the
CPU), before the sampler's own exploration. Issue 22's run never proposed the default's
``attention-backend(backend='sage')`` with fp8, the fastest per-forward part of the
quantization table at the Wan2.1-1.3B size on the H100 (benchmarks/RESULTS.md, "End to end,
Wan2.1-1.3B size, 480p x 81 frames"); seeded, it is measured among the first candidates.

The study lives in ``OUT/study.db`` (SQLite): a killed run, started again with the same
settings, resumes it; the candidate that was running is tried again. Baseline outputs and
calibrations made on the fly are kept under ``OUT`` too.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import torch

from cadence import generation
from cadence.accel.registry import get_technique
from cadence.models import adapter_for, find_transformer
from cadence.models.defaults import default_recipe
from cadence.recipe import Recipe
from cadence.tune import quality, realsize
from cadence.tune.check import Modelled, compare, computed_share, held_out_check, holds
from cadence.tune.cost import CostModel
from cadence.tune.evaluate import FAILURES, Evaluator, TooSlow
from cadence.tune.prompts import PromptSplit, split_prompts
from cadence.tune.settings import TuneSettings, duration
from cadence.tune.space import KNOB_RANGE, KNOB_STEP, SearchSpace, features, native_linear_format

STUDY = "cadence-tune"
# A candidate whose median time per case is this much longer than the best found's is
# rejected: timings on a shared machine move by several per cent between identical runs.
SLOW_MARGIN = 0.25
# One generation is stopped only past this multiple of the best found's time (before any
# candidate meets the bar, of the baseline's: no acceleration on this device, and a measured
# miss still teaches the sampler). Single cases jitter more than medians: on the H200,
# ref-video's 1-s generations are bound by the CPU's kernel launches, and one case in ten
# took up to twice its neighbours' time.
STOP_FACTOR = 2.0
# The median over this many cases (or all of them, when fewer) before a candidate is rejected
# for its time: one slow first case must not reject it for good.
TIMED_CASES = 3
# Random candidates before the sampler models the space: few, since on a CPU a candidate can
# cost minutes and the shipped default's parts are tried first anyway.
STARTUP_TRIALS = 3
# The fastest candidates meeting the bars on the tuning cases, confirmed together.
CONFIRMED_AT_ONCE = 3
# Compiled candidates each trace the blocks with other hooks around them; dynamo's default
# limit (8 graphs per code object) would leave the later ones running eager, timed as if compiled.
RECOMPILE_LIMIT = 256
# With --speed-at: a candidate modelled this much slower than the best found is rejected. Not
# at the best itself: the best found may not hold on the confirmation cases, and the next
# fastest are confirmed then.
MODELLED_MARGIN = 0.1
# The shipped default's step policy is tried at its budget plus each of these (on the search's
# grid, within its range) with the default's per-forward part: on ref-video at 50 steps on the
# H200 magcache's shipped 0.3 gave 33 dB against a 35-dB bar (issue 22), and the budgets above
# it are where the step policy meets the bar. Three: each is one candidate of the study.
BUDGET_LADDER = (0.15, 0.3, 0.45)
OUT_OF_TIME = "the time budget ran out"
INTERRUPTED = "interrupted; tried again on resume"


class TuneRefused(ValueError):
    """Refused or ended without an answer; what was measured is on disk under ``out``."""


@dataclass
class TuneResult:
    recipe: Recipe | None  # None: no candidate met the bar
    best: dict | None  # the chosen trial's measurements (or, unmet, the one nearest the bar)
    check: dict | None  # the held-out check
    space: SearchSpace
    split: PromptSplit
    trials: list = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    baseline_seconds: float = 0.0
    out: Path | None = None
    confirmations: list[dict] = field(default_factory=list)  # check.compare's entries, with the search's figures
    speed_at: str | None = None  # the real size speeds were modelled at (--speed-at)
    part_times: list = field(default_factory=list)  # realsize.PartTime of each per-forward part measured there


def check_adapter(pipe) -> None:
    """Refuse, before any work, a pipeline whose transformer cadence has no adapter for."""
    try:
        adapter_for(find_transformer(pipe))
    except (TypeError, ValueError) as error:
        raise TuneRefused(f"cannot tune this model: {error}") from None


def tune(pipe, settings: TuneSettings) -> TuneResult:
    """Search the fastest recipe meeting the bars on ``pipe``; write ``settings.out``."""
    started = time.monotonic()
    settings.check()
    check_adapter(pipe)
    if settings.speed_at is not None:
        try:
            realsize.check_family(settings.speed_at, find_transformer(pipe))
        except TypeError as error:
            raise TuneRefused(str(error)) from None
    space = SearchSpace.from_registry(settings.include, settings.exclude, settings.device, settings.compile,
                                      model=find_transformer(pipe), speed_at=settings.speed_at)
    split = split_prompts(settings.prompts, video=generation.is_video(pipe), tuning=settings.tuning_prompts,
                          check=settings.check_prompts, seeds=settings.seeds, confirm=settings.confirm_prompts)
    size = generation.resolve_size(pipe, settings.height, settings.width, settings.frames)
    generation.check_steps(settings.steps, generation.step_limit(pipe))
    settings.out.mkdir(parents=True, exist_ok=True)
    pipe.set_progress_bar_config(disable=True)
    run = _Run(pipe, settings, space, split, size, started)
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        return run.search()


class _Run:
    def __init__(self, pipe, settings: TuneSettings, space: SearchSpace, split: PromptSplit, size, started: float):
        self.pipe, self.settings, self.space, self.split, self.started = pipe, settings, space, split, started
        self.evaluator = Evaluator(pipe, size, settings.steps, settings.guidance_scale, settings.device, settings.out)
        self.cost = CostModel()
        self.measures = quality.measures(settings)
        self.notes = list(space.notes)
        self.baseline_seconds = 0.0
        self.confirmations: list[dict] = []
        self.late_warm_up = 0.0  # seconds of one compiled recipe's warm-up (measure_baselines)
        self.load_before = _load()
        self.speed: realsize.SpeedAt | None = None  # built once the baselines are made (search)
        self.resumed = False  # the study held complete candidates, whose parts this run has not measured

    def modelled(self, keep: float = 0.0) -> Modelled | None:
        """The modelled time of the confirmation and the check: a part they measure anew is
        stopped where the time budget ends, less ``keep`` seconds (the confirmation keeps the
        check's: ``check_reserve``); a stopped measure fails its one recipe (``compare``)."""
        if self.speed is None:
            return None
        return lambda recipe, share: self.speed.relative_time(
            recipe, share, deadline=max(1.0, self.remaining() - keep))

    def remaining(self) -> float:
        return self.settings.time_budget - (time.monotonic() - self.started)

    # -- the study -------------------------------------------------------------------------
    def open_study(self) -> optuna.Study:
        storage = f"sqlite:///{(self.settings.out / 'study.db').resolve()}"
        # the bars are the trials' constraints (Trial.set_constraint): the sampler learns where they hold
        sampler = optuna.samplers.TPESampler(seed=self.settings.sampler_seed, n_startup_trials=STARTUP_TRIALS)
        pruner = optuna.pruners.ThresholdPruner(upper=quality.PSNR_MARGIN_DB)
        optuna.logging.set_verbosity(optuna.logging.ERROR)  # rejections are in the report, with reasons
        study = optuna.create_study(storage=storage, study_name=STUDY, sampler=sampler, pruner=pruner,
                                    direction="minimize", load_if_exists=True)
        identity = self.settings.identity()
        recorded = study.user_attrs.get("settings")
        if recorded is None:
            study.set_user_attr("settings", identity)
        elif recorded != identity:
            changed = sorted(key for key in {*identity, *recorded} if recorded.get(key) != identity.get(key))
            raise TuneRefused(
                f"{self.settings.out}/study.db holds a study made with other settings ({', '.join(changed)} differ: "
                f"{', '.join(f'{k}={recorded.get(k)!r}' for k in changed)}); resume it with the same settings, or "
                "give another --out")
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            # left running by an interrupted run: marked failed, and its candidate tried again
            study._storage.set_trial_user_attr(trial._trial_id, "rejected", INTERRUPTED)
            study._storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
            study.enqueue_trial(trial.params, skip_if_exists=False)
            self.notes.append(f"resumed: trial {trial.number} ({trial.user_attrs.get('recipe', '?')}) was interrupted "
                              "and is tried again")
        for trial in study.trials:
            if "relative_time" in trial.user_attrs:
                self.cost.add(trial.user_attrs["features"], trial.user_attrs["relative_time"])
        self.resumed = any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
        return study

    def search(self) -> TuneResult:
        from cadence.tune.report import write_outputs

        study = self.open_study()
        self.measure_baselines(study)
        if self.settings.speed_at is not None:
            try:
                self.speed = realsize.SpeedAt(realsize.spec(self.settings.speed_at), self.settings.device,
                                              self.settings.guidance_scale)
                self.speed.per_step_seconds(Recipe())  # the baseline's part: the empty recipe
            except FAILURES as error:  # out of memory, no bf16 kernel on this device: nothing to model from
                raise TuneRefused(f"--speed-at {self.settings.speed_at}: the unaccelerated real-size transformer "
                                  f"cannot run on {self.settings.device}: {type(error).__name__}: {error}; the "
                                  f"baselines made are kept in {self.settings.out}") from None
            self.notes.append(f"speeds modelled at {self.settings.speed_at} from measured per-step times "
                              f"({realsize.SPEED_STEPS} steps with CFG per per-forward part); the reused forwards' "
                              "own cost is left out")
            self.notes.append(f"a new per-forward part is measured at {self.settings.speed_at} only where a measure "
                              "of the median length so far fits in what the time budget leaves after the reserve "
                              "(the reserve counts the same median); a measure running longer is stopped there and "
                              "its candidate rejected as out of time")
            self.notes.append("a candidate whose per-forward part is measured is rejected before its cases run when "
                              "that part's time, times the least share of the block work its step policy computes "
                              "(its budget, half of it with cfg_reuse, less one step; all of it without a step "
                              f"policy), is more than {MODELLED_MARGIN:.0%} slower than the best found")
        default = self.shipped_default()
        if default is not None and not study.trials:
            self.notes.append(enqueue_seeds(study, self.space, seeds(default, self.space)))
        searching = self.remaining() - self.reserve()
        if searching > 0 and (self.settings.trials is None or self.settings.trials > _finished(study)):
            trials = None if self.settings.trials is None else self.settings.trials - _finished(study)
            study.optimize(self.objective, n_trials=trials, timeout=searching, catch=FAILURES,
                           callbacks=[self.stop_when_out_of_time])
        else:
            self.notes.append("no time left to search after the baselines" if searching <= 0 else
                              f"the study already holds {self.settings.trials} candidates (--trials)")
        best, met = self.confirm(study)
        check = held_out_check(self.evaluator, self.measures, self.split.check_cases, Recipe.parse(best["recipe"]),
                               default, self.notes, self.modelled()) if met else None
        result = TuneResult(Recipe.parse(best["recipe"]) if met else None, best, check, self.space, self.split,
                            study.trials, self.notes, self.baseline_seconds, self.settings.out, self.confirmations,
                            self.settings.speed_at, self.speed.rows() if self.speed is not None else [])
        write_outputs(result, self.settings, self.measures, self.load_before)
        if not met:
            raise TuneRefused(self.unmet_message(best, study))
        return result

    def measure_baselines(self, study: optuna.Study) -> None:
        """Time the baseline once, refuse a budget too short for it, then make every tuning
        baseline (from disk when an earlier run made it)."""
        cases = self.split.tuning_cases
        self.evaluator.warm_up(Recipe(), cases[0])
        self.baseline_seconds = self.evaluator.time_baseline(cases[0])
        study.set_user_attr("baseline_seconds", self.baseline_seconds)
        missing = sum(not self.evaluator._baseline_path(case).is_file() for case in cases)
        needed = self.baseline_seconds * missing + self.reserve()
        if needed > self.remaining():
            spent = self.settings.time_budget - self.remaining()
            raise TuneRefused(
                f"--time-budget {duration(self.settings.time_budget)} is too short for the baseline itself: one "
                f"unaccelerated generation takes {self.baseline_seconds:.1f} s here, and the {missing} tuning "
                f"baseline(s) still to make plus the confirmation and the held-out check "
                f"({len(self.split.confirm_cases)} and {len(self.split.check_cases)} cases, the baseline and the "
                f"recipes each) need about {duration(needed)} more, {duration(spent)} being spent; give at least "
                f"--time-budget {duration(spent + needed * 2)}, or fewer prompts, seeds or steps. The baseline timing "
                f"and outputs made are kept in {self.settings.out}")
        for case in cases:
            self.evaluator.baseline(case)
        if self.space.late:  # what a compiled recipe's warm-up costs here, for the reserve
            begin = time.monotonic()
            self.evaluator.warm_up(self.space.late_recipe(), cases[0])
            self.late_warm_up = time.monotonic() - begin
            study.set_user_attr("late_warm_up_seconds", self.late_warm_up)

    def reserve(self) -> float:
        """Seconds kept after the search: one round of confirmation (per case the baseline and
        ``CONFIRMED_AT_ONCE`` candidates, twice that with the late techniques, each faster than
        the baseline) and the held-out check (per case the baseline and two recipes, the tuned
        one and the shipped default), with a measured warm-up for each compiled recipe."""
        recipes = CONFIRMED_AT_ONCE * (2 if self.space.late else 1)
        confirming = (1 + recipes) * len(self.split.confirm_cases)
        warm_ups = self.late_warm_up * CONFIRMED_AT_ONCE
        return self.baseline_seconds * confirming + warm_ups + self.speed_reserve() + self.check_reserve()

    def check_reserve(self) -> float:
        """The held-out check's part of the reserve, without its real-size measure (the shipped
        default's part, in ``speed_reserve``): per case the baseline and two recipes, each
        faster than the baseline, and a warm-up for each compiled one."""
        return self.baseline_seconds * 2 * len(self.split.check_cases) + self.late_warm_up * 2

    def speed_reserve(self) -> float:
        """With --speed-at: the per-forward parts the first confirmation round and the check
        may measure anew at the real size, each as long as the median measure so far
        (warm-up and timed steps; a longer one is stopped where the budget ends): the shipped
        default's, each candidate's with the late techniques added and, in a resumed study,
        each candidate's own (measured by the run that tried it, not this one). Later rounds
        run only where their measures fit (``confirm``)."""
        if self.speed is None:
            return 0.0
        new_per_candidate = bool(self.space.late) + self.resumed
        return self.speed.typical_measure() * (1 + CONFIRMED_AT_ONCE * new_per_candidate)

    def new_measures_seconds(self, recipes) -> float:
        """With --speed-at: about how long measuring the parts of ``recipes`` not yet measured at
        the real size takes (each as long as the median measure so far); 0 without."""
        if self.speed is None:
            return 0.0
        parts = {str(realsize.per_forward_part(r)) for r in recipes if not self.speed.is_measured(r)}
        return self.speed.typical_measure() * len(parts)

    def real_size_measure_fits(self, trial: optuna.Trial, recipe: Recipe) -> None:
        """With --speed-at: reject ``recipe`` (as out of time) when its per-forward part is not
        measured yet and a measure of the median length so far does not fit in what the time
        budget leaves after the reserve (one that fits and then runs longer is stopped there:
        ``per_forward_ratio``)."""
        if self.speed is None or self.speed.is_measured(recipe):
            return
        left, needed = self.remaining() - self.reserve(), self.speed.typical_measure()
        if left < needed:
            trial.set_user_attr("rejected", f"{OUT_OF_TIME}: measuring its per-forward part at "
                                            f"{self.settings.speed_at} takes about {needed:.1f} s, "
                                            f"{max(left, 0):.1f} s are left after the confirmation's and the check's "
                                            "reserve")
            raise optuna.TrialPruned()

    def stop_when_out_of_time(self, study: optuna.Study, trial) -> None:
        durations = [t.duration.total_seconds() for t in study.trials if t.duration is not None]
        typical = sorted(durations)[len(durations) // 2] if durations else 0.0
        if self.remaining() - self.reserve() < typical:
            study.stop()

    def shipped_default(self) -> Recipe | None:
        """The family's shipped default, as this search could have found it (or None)."""
        try:
            shipped = Recipe.parse(default_recipe(type(find_transformer(self.pipe)).__name__).recipe)
            return self.space.restrict(shipped) or None
        except ValueError:
            return None

    # -- one candidate -------------------------------------------------------------------
    def objective(self, trial: optuna.Trial) -> float:
        """A candidate's relative time; its bars become the trial's constraints once, when it
        ends (optuna keeps the first value set, so per-case updates would leave case one's)."""
        try:
            return self._objective(trial)
        finally:
            for measure, value in zip(self.measures, trial.user_attrs.get("constraints", ())):
                trial.set_constraint(measure.name, value)

    def _objective(self, trial: optuna.Trial) -> float:
        try:
            recipe = self.space.suggest(trial)
        except ValueError as error:  # a combination of knobs the technique refuses
            trial.set_user_attr("recipe", ", ".join(f"{k}={v}" for k, v in trial.params.items() if v != "none"))
            trial.set_user_attr("rejected", str(error))
            raise
        trial.set_user_attr("recipe", str(recipe))
        if not recipe:
            trial.set_user_attr("rejected", "removes nothing (the baseline itself)")
            raise optuna.TrialPruned()
        trial.set_user_attr("candidate", str(recipe))
        repeated = self.repeat(trial, str(recipe))
        if repeated is not None:
            return repeated
        found = features(recipe)
        trial.set_user_attr("features", found)
        best = self.best_time(trial.study)
        reason = self.cost.cannot_win(found, best)
        if reason:
            trial.set_user_attr("rejected", reason)
            raise optuna.TrialPruned()
        # the part timed there is the same before and after prepare: one measured already is
        # read (and may reject the candidate) before anything runs
        ratio = None
        if self.speed is not None and self.speed.is_measured(recipe):
            ratio = self.per_forward_ratio(trial, recipe, found, best)
        else:
            self.real_size_measure_fits(trial, recipe)
        try:
            recipe = self.evaluator.prepare(recipe)
            trial.set_user_attr("recipe", str(recipe))
            self.evaluator.warm_up(recipe, self.split.tuning_cases[0])
        except FAILURES as error:
            trial.set_user_attr("rejected", f"{type(error).__name__}: {error}")
            raise
        if ratio is None:
            ratio = self.per_forward_ratio(trial, recipe, found, best)
        opening = self.baseline_seconds
        limit = best * STOP_FACTOR
        rows = []
        for index, case in enumerate(self.split.tuning_cases):
            left = self.remaining() - self.reserve()
            # with --speed-at the tuned model's times do not decide: only the time budget stops a generation
            deadline = max(1.0, left) if ratio is not None else min(limit * opening, max(1.0, left))
            try:
                row = self.evaluator.run(recipe, case, deadline=deadline)
            except TooSlow as slow:
                self.cost.add(found, slow.seconds / opening)  # at least this slow
                out_of_time = self.remaining() - self.reserve() <= 1.0
                trial.set_user_attr("rejected", f"{slow}: {OUT_OF_TIME if out_of_time else ''}"
                                    f"{'' if out_of_time else f'slower than {limit:.2f}x the baseline time'}")
                raise optuna.TrialPruned() from None
            except FAILURES as error:
                trial.set_user_attr("rejected", f"{type(error).__name__}: {error}")
                raise
            row["values"] = quality.evaluate(self.measures, row, case)
            rows.append(row)
            relative = self.record(trial, rows, opening, found, ratio)
            if ratio is not None and relative > best * (1 + MODELLED_MARGIN):
                self.cost.add(found, relative)
                trial.set_user_attr("rejected", f"time: modelled at {self.settings.speed_at} {relative:.2f}x the "
                                                f"baseline's after {len(rows)} case(s), the time to beat is {best:.2f}x")
                raise optuna.TrialPruned()
            timed = len(rows) >= min(TIMED_CASES, len(self.split.tuning_cases))
            if ratio is None and timed and relative > best * (1 + SLOW_MARGIN):  # no faster than what it must beat
                self.cost.add(found, relative)
                trial.set_user_attr("rejected", f"time: {relative:.2f}x the baseline's on the first {len(rows)} "
                                                f"case(s), the time to beat is {best:.2f}x")
                raise optuna.TrialPruned()
            shortfall = self.settings.min_psnr - _mean([r["psnr"] for r in rows])
            trial.report(shortfall, index)
            if trial.should_prune() or self.misses_by_margin(rows):
                self.cost.add(found, trial.user_attrs["relative_time"])  # its time is measured all the same
                trial.set_user_attr("rejected", f"quality: {quality.summary(self.measures, rows)} on the first "
                                                f"{len(rows)} of {len(self.split.tuning_cases)} cases misses the bar")
                raise optuna.TrialPruned()
        if ratio is None:
            closing = self.evaluator.time_baseline(self.split.tuning_cases[-1])
            self.baseline_seconds = closing
            relative = self.record(trial, rows, (opening + closing) / 2, found, ratio)
        else:  # the modelled time decides: the tuned model's baseline beside it would be unused
            relative = self.record(trial, rows, opening, found, ratio)
        self.cost.add(found, relative)
        return relative

    def per_forward_ratio(self, trial: optuna.Trial, recipe: Recipe, found: dict, best: float) -> float | None:
        """With --speed-at: the per-step time of ``recipe``'s per-forward part at the real size
        over the baseline's (measured there once per part, stopped where the search's time
        ends); a candidate whose ratio times the least share its step policy computes
        (``least_share``) cannot come near the best found is rejected before it runs. None
        without --speed-at."""
        if self.speed is None:
            return None
        try:
            ratio = self.speed.relative_time(recipe, 1.0, deadline=max(0.0, self.remaining() - self.reserve()))
        except realsize.OutOfTime as stopped:  # this run's end, not the candidate's doing: tried again on resume
            trial.set_user_attr("rejected", f"{OUT_OF_TIME}: {stopped}")
            raise optuna.TrialPruned() from None
        except FAILURES as error:
            trial.set_user_attr("rejected", f"at {self.settings.speed_at}: {type(error).__name__}: {error}")
            raise
        trial.set_user_attr("per_forward_ratio", ratio)
        share = least_share(recipe, self.settings.steps)
        if ratio * share <= best * (1 + MODELLED_MARGIN):
            return ratio
        self.cost.add(found, ratio * share)  # exactly this slow without a step policy, at least with one
        if not any(config.level == realsize.STEP_LEVEL for config in recipe.techniques):
            trial.set_user_attr("relative_time", ratio)
            trial.set_user_attr("rejected", f"time: modelled at {self.settings.speed_at} {ratio:.2f}x the baseline's "
                                            f"(no step policy), the time to beat is {best:.2f}x")
        else:
            trial.set_user_attr("rejected", f"time: modelled at {self.settings.speed_at} at least "
                                            f"{ratio * share:.2f}x the baseline's (its per-forward part {ratio:.2f}x, "
                                            f"its step policy computing at least {share:.2f} of the block work), the "
                                            f"time to beat is {best:.2f}x")
        raise optuna.TrialPruned()

    def repeat(self, trial: optuna.Trial, candidate: str) -> float | None:
        """The outcome of an earlier trial of the same candidate (the sampler's grid repeats
        itself): its value, its rejection (for quality, its time or by the cost model: the time
        to beat only falls as the study goes) or its failure (the same error again); None when
        it must run."""
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
        for earlier in trial.study.get_trials(deepcopy=False, states=states):
            attrs = earlier.user_attrs
            if attrs.get("candidate") != candidate or earlier.number == trial.number or "rejected" not in attrs and \
                    earlier.state != optuna.trial.TrialState.COMPLETE:
                continue  # a failure without a reason was killed (KeyboardInterrupt), not refused
            if OUT_OF_TIME in attrs.get("rejected", "") or attrs.get("rejected") == INTERRUPTED:
                continue  # stopped by the end of an earlier run, not by what it measured
            for key, value in attrs.items():
                trial.set_user_attr(key, value)
            trial.set_user_attr("repeat_of", earlier.number)
            if earlier.state == optuna.trial.TrialState.COMPLETE:
                return earlier.value
            trial.set_user_attr("rejected", f"as trial {earlier.number}, the same candidate: {attrs['rejected']}")
            # A repeated failure is pruned, not failed again: TPE leaves FAIL trials out of its
            # model, so a failing candidate stays as likely as before and is proposed again and
            # again (909 of 1012 trials on ref-video); a PRUNED trial with no intermediate value
            # ranks after every complete one and every one pruned on a measured case, in the
            # group the sampler learns to avoid. The report lists it as rejected, with the error.
            raise optuna.TrialPruned()
        return None

    def record(self, trial, rows: list[dict], baseline: float, found: dict, ratio: float | None = None) -> float:
        """The candidate's relative time: measured here, or with ``ratio`` (--speed-at) the
        per-forward ratio at the real size times the block work it computed on ``rows``."""
        measured = statistics.median(r["seconds"] for r in rows) / baseline
        share = computed_share(rows)
        relative = measured if ratio is None else ratio * share
        trial.set_user_attr("relative_time", relative)
        trial.set_user_attr("computed_share", share)
        if ratio is not None:
            trial.set_user_attr("measured_relative_time", measured)
        trial.set_user_attr("baseline_seconds", baseline)
        trial.set_user_attr("seconds", [r["seconds"] for r in rows])
        trial.set_user_attr("quality", quality.means(self.measures, rows))
        trial.set_user_attr("per_case", [r["values"] for r in rows])
        trial.set_user_attr("compute_fraction", rows[-1]["compute_fraction"])
        trial.set_user_attr("constraints", quality.constraints(self.measures, rows))
        return relative

    def misses_by_margin(self, rows: list[dict]) -> bool:
        """The bars other than PSNR (which the pruner watches), with the same rule."""
        return quality.misses(self.measures[1:], rows)

    def best_time(self, study: optuna.Study) -> float:
        """The relative time to beat: the best feasible candidate's, or the baseline's (1.0)."""
        times = [t.value for t in _feasible(study)]
        return min([1.0, *times])

    def confirm(self, study: optuna.Study) -> tuple[dict, bool]:
        """The chosen candidate (confirmed) and True, or the one nearest the bars and False."""
        ranked, seen = [], set()
        for trial in sorted(_feasible(study), key=lambda t: t.value):
            if trial.user_attrs["recipe"] not in seen:
                seen.add(trial.user_attrs["recipe"])
                ranked.append(trial)
        cases = self.split.confirm_cases
        for start in range(0, len(ranked), CONFIRMED_AT_ONCE):
            batch = ranked[start:start + CONFIRMED_AT_ONCE]
            trials = {trial.number: trial for trial in batch}
            recipes = {}  # (trial number, with the late techniques added) -> recipe
            for trial in batch:
                recipe = Recipe.parse(trial.user_attrs["recipe"])
                recipes[trial.number, False] = recipe
                late = self.space.with_late(recipe)
                if late is not None:
                    recipes[trial.number, True] = late
            needed = self.baseline_seconds * ((1 + len(recipes)) * len(cases) + 2 * len(self.split.check_cases))
            default = self.shipped_default()  # measured at the real size by the held-out check
            needed += self.new_measures_seconds([*recipes.values(), *([default] if default is not None else [])])
            if start and self.remaining() < needed:
                self.notes.append(f"time ran out after confirming {start} of the {len(ranked)} candidates that met the "
                                  "bars on the tuning cases")
                break
            # a measure of the confirmation's is stopped where the check's time begins
            kept = self.check_reserve() + self.new_measures_seconds([default] if default is not None else [])
            found = compare(self.evaluator, self.measures, cases, recipes, self.modelled(keep=kept))
            for (number, added), entry in found.items():
                self.confirmations.append({"number": number, "late_added": added, "search_speedup": 1 / trials[
                    number].value, "search_quality": trials[number].user_attrs["quality"], **entry})
            held = [(key, entry) for key, entry in found.items() if holds(self.measures, entry)]
            if held:
                (number, added), entry = max(held, key=lambda item: item[1]["speedup"])
                return {"number": number, **trials[number].user_attrs, "recipe": entry["recipe"], "late_added": added,
                        "confirmation": entry}, True
        return self.nearest(study), False

    def nearest(self, study: optuna.Study) -> dict:
        """The candidate nearest the bars: of the confirmed ones, by their confirmation; else of
        the measured ones (the complete ones first)."""
        confirmed = [c for c in self.confirmations if c["quality"] is not None]
        if confirmed:
            entry = min(confirmed, key=lambda c: max(m.bar - c["quality"][m.name] for m in self.measures))
            return {"number": entry["number"], "recipe": entry["recipe"], "quality": entry["quality"],
                    "relative_time": 1 / entry["speedup"], "confirmed": True}
        measured = [t for t in study.trials if "constraints" in t.user_attrs]
        if not measured:
            return {"recipe": str(Recipe()), "constraints": None}
        complete = [t for t in measured if t.state == optuna.trial.TrialState.COMPLETE]
        nearest = min(complete or measured, key=lambda t: max(t.user_attrs["constraints"]))
        return {"number": nearest.number, **nearest.user_attrs}

    def unmet_message(self, best: dict, study: optuna.Study) -> str:
        bars = quality.bars(self.measures)
        if self.confirmations:
            missed = "; ".join(f"{c['recipe']} ({quality.describe(self.measures, c['quality'])}, {c['speedup']:.2f}x)"
                               if c["quality"] else f"{c['recipe']} (failed: {c['failed']})" for c in self.confirmations)
            candidates = len({c["number"] for c in self.confirmations})
            return (f"{candidates} candidate(s) met {bars} on the tuning cases, but none held on the "
                    f"{len(self.split.confirm_cases)} confirmation cases: {missed}; everything measured is in "
                    f"{self.settings.out}/report.md and study.db")
        if best.get("constraints") is None:
            return (f"no candidate was measured in {len(study.trials)} trial(s) (time budget or failures), so none "
                    f"meets {bars}; see {self.settings.out}/report.md")
        modelled = f" (modelled at {self.settings.speed_at})" if self.speed is not None else ""
        return (f"no candidate meets {bars} after {len(study.trials)} trial(s); the best found is {best['recipe']} "
                f"with {quality.describe(self.measures, best['quality'])} at {best['relative_time']:.2f}x the "
                f"baseline's time{modelled}; everything measured is in {self.settings.out}/report.md and study.db")


def least_share(recipe: Recipe, steps: int) -> float:
    """The least share of the block work ``recipe`` computes in a run of ``steps``: 1.0 without
    a step policy; 0 for one in threshold mode, which promises no share.

    In budget mode the pacer spends every forward its budget allows (it computes every
    remaining step once its slots reach them): per branch ``slots`` computed forwards of the
    span, rounded down from the budget, and the head and tail blocks (a share ``h`` of the
    stack, at most the budget: ``StepReuse`` refuses less) on every forward
    (accel/cache/_base.py, ``_Pacer`` and ``StepReuse._slots``). A share ``f = slots / steps``
    of the span's forwards computed gives ``f (1 - h) + h``, at most one step below the budget.
    With ``cfg_reuse`` the unconditional forward does not run at all on a reused step, head and
    tail included: ``f + (1 - f) h / 2``, which falls with ``h`` to half the budget at ``h`` equal
    to it (on the tiny Wan, first-blocks at 0.6 computed 0.4). So: the budget less one step, or
    with ``cfg_reuse`` half of it less one step."""
    policies = [config for config in recipe.techniques if config.level == realsize.STEP_LEVEL]
    if not policies:
        return 1.0
    budget = getattr(policies[0], "budget", 0.0) or 0.0
    if not budget:
        return 0.0
    return max(0.0, (budget / 2 if getattr(policies[0], "cfg_reuse", False) else budget) - 1.0 / steps)


def seeds(default: Recipe, space: SearchSpace) -> list[tuple[Recipe, str]]:
    """The candidates the study starts from, each with why: the shipped default, each of its
    searched techniques alone (which of them costs the fidelity) when it has several, its
    step policy at each ``BUDGET_LADDER`` larger budget on the search's grid, with the default's
    per-forward part (budgets past the searched range are left out), then each of those with
    the device's native low-precision linears added (``native_linear_format``; only where the
    space searches that format and the default quantizes no linear of its own)."""
    searched = [config for config in default.techniques if config.name not in space.late]
    if not searched:
        return []
    starts = [(Recipe(searched), "the shipped default" + (f", {', '.join(space.late)} added at the confirmation"
                                                          if len(searched) < len(default.techniques) else ""))]
    if len(searched) > 1:
        starts += [(Recipe([config]), "one technique of the shipped default alone") for config in searched]
    policy = next((c for c in searched if c.level == realsize.STEP_LEVEL and getattr(c, "budget", 0)), None)
    if policy is None or not space.params_of(Recipe([policy])).get("budget"):
        return starts
    high = KNOB_RANGE["budget"][1]
    ladder = []
    for rise in BUDGET_LADDER:
        budget = round(round((policy.budget + rise) / KNOB_STEP) * KNOB_STEP, 2)
        if budget > high:
            break
        raised = type(policy).from_params({**policy.params(), "budget": budget})
        ladder.append((Recipe([raised if config is policy else config for config in searched]),
                       f"the shipped default's step policy at budget {budget:g}"))
    native = native_linear_format(space.device)
    if native is None or native not in space.choices["bit"] or any(c.level == "bit" for c in searched):
        return starts + ladder
    linears = get_technique(native).config.from_params({})
    why_native = f"with {native} linears: this GPU's native low-precision format"
    native_ladder = [(Recipe([*recipe.techniques, linears]), f"{why}, {why_native}") for recipe, why in ladder]
    return starts + ladder + native_ladder


def enqueue_seeds(study: optuna.Study, space: SearchSpace, starts: list[tuple[Recipe, str]]) -> str:
    """Enqueue ``starts`` (``seeds``) in order, before the sampler's own candidates; the report's note on them."""
    for start, _ in starts:
        study.enqueue_trial(space.params_of(start))
    return "seeded before the sampler's own candidates: " + "; ".join(
        f"trial {number}: `{start}` ({why})" for number, (start, why) in enumerate(starts))


def _finished(study: optuna.Study) -> int:
    return sum(t.state.is_finished() for t in study.trials)


def _feasible(study: optuna.Study) -> list:
    return [t for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if all(c <= 0 for c in t.user_attrs.get("constraints", [1.0]))]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
