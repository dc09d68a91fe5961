"""The ``search`` section: space, architecture space, searcher, scheduler, trial budget; and
its rules (``SearchSpec.problems``). Lives beside the search stage; ``bigopt.spec`` re-exports
it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator

from bigopt.sections import Section

if TYPE_CHECKING:
    from bigopt.spec import JobSpec

DOMAIN_KINDS = {"choice": "a non-empty list of values", "randint": "[lower, upper) integers",
                "qrandint": "[lower, upper, q] integers", "uniform": "[lower, upper]",
                "loguniform": "[lower, upper], lower > 0", "quniform": "[lower, upper, q]",
                "qloguniform": "[lower, upper, q], lower > 0"}


def domain_problem(value: Any) -> str | None:
    """Why ``value`` is not a search domain (``{choice: [...]}``, ``{loguniform: [a, b]}``, ...)."""
    if not isinstance(value, dict) or len(value) != 1:
        return ("must be one of {" + ", ".join(f"{k}: {v}" for k, v in DOMAIN_KINDS.items()) + "}")
    (kind, args), = value.items()
    if kind not in DOMAIN_KINDS:
        return f"unknown domain {kind!r}; expected one of: {', '.join(DOMAIN_KINDS)}"
    if not isinstance(args, list) or not args:
        return f"{kind}: expects {DOMAIN_KINDS[kind]} (an empty choice has nothing to search)"
    if kind == "choice":
        return None
    want = 3 if kind.startswith("q") else 2
    if len(args) != want or not all(isinstance(a, int | float) and not isinstance(a, bool) for a in args):
        return f"{kind}: expects {DOMAIN_KINDS[kind]}, got {args!r}"
    if args[0] >= args[1]:
        return f"{kind}: lower {args[0]} must be below upper {args[1]}"
    if "log" in kind and args[0] <= 0:
        return f"{kind}: lower must be > 0 on a log scale"
    return None


class ArchSpaceSpec(Section):
    """An architecture space over the model zoo (``bigopt.search.arch``). Every list is a choice.

    Images: a model is a stem and ``depth`` stages; each stage picks its block type, width,
    kernel size (resnet/plain) and heads (transformer), and all but the first halve the
    resolution. ``plain`` is ``resnet`` without its skip connection (the skip pattern as a
    choice). ``mlp`` is a family of its own (depth x width). Text: GPT depth, width, heads.
    Choices that do not apply (a kernel for a dense block, the stages past ``depth``) are
    conditional: ignored when building the model, and shown as null in ``trials.parquet``.
    """

    families: list[Literal["cnn", "mlp", "gpt"]] = Field(
        default_factory=lambda: ["cnn", "mlp"], min_length=1,
        description="Model kinds to search (cnn and mlp for images, gpt for text).")
    depth: list[int] = Field(default_factory=lambda: [1, 2, 3], min_length=1,
                             description="Stages (cnn), hidden layers (mlp) or blocks (gpt).")
    blocks: list[Literal["resnet", "plain", "dense", "transformer"]] = Field(
        default_factory=lambda: ["resnet", "plain", "dense", "transformer"], min_length=1)
    widths: list[int] = Field(default_factory=lambda: [16, 32, 64], min_length=1,
                              description="Channels per cnn stage, d_model for gpt.")
    stem: list[int] = Field(default_factory=lambda: [16, 32], min_length=1)
    kernels: list[Literal[3, 5, 7]] = Field(default_factory=lambda: [3, 5], min_length=1)
    heads: list[int] = Field(default_factory=lambda: [1, 2, 4], min_length=1)
    mlp_widths: list[int] = Field(default_factory=lambda: [64, 128, 256, 512], min_length=1)
    max_params: int | None = Field(
        None, ge=1, description="Points with more parameters are rejected before a trial starts.")


class EvolutionOptions(Section):
    population: int = Field(8, ge=2)
    tournament: int = Field(3, ge=1)
    mutations: int = Field(1, ge=1, description="Decisions changed per child.")
    candidates: int = Field(
        6, ge=1, description="Children bred per trial; the one a TPE-style density ratio of the "
        "trials so far ranks first is trained (1: plain regularized evolution).")
    guided: float = Field(
        0.5, ge=0, le=1, description="Probability that a mutation draws the new value from the "
        "good trials' density (TPE's l(x)) instead of uniformly (0: plain uniform mutation).")
    crossover: float = Field(
        0.5, ge=0, le=1, description="Probability that a child's parent is the uniform crossover "
        "of two tournament winners (0: one winner, the paper's algorithm).")
    fresh: int = Field(
        2, ge=0, description="How many of the candidates are whole points drawn from the good "
        "trials' density (TPE's proposal) instead of children; below candidates when set "
        "(with candidates: 1, plain regularized evolution, the default becomes 0).")


class RLOptions(Section):
    """REINFORCE controller settings; null: ``bigopt.search.RLSearcher``'s defaults."""

    policy: Literal["lstm", "transformer"] = "lstm"
    lr: float | None = Field(None, gt=0)
    entropy_weight: float | None = Field(None, ge=0)
    baseline_decay: float | None = Field(None, ge=0, lt=1)
    candidates: int = Field(
        8, ge=1, description="Policy samples per trial; the one a TPE-style density ratio of the "
        "trials so far ranks first is trained (1: plain REINFORCE).")


class SchedulerSpec(Section):
    """Trial scheduling, in training steps. asha: stop poor trials early. pbt / pb2: every
    ``interval_steps`` the bottom ``quantile`` of trials copies a top trial's checkpoint
    (exploit) and changes its ``mutate`` values (explore: PBT perturbs, PB2 fits a GP bandit)."""

    kind: Literal["fifo", "asha", "pbt", "pb2"] = "fifo"
    grace_steps: int = Field(50, ge=1, description="asha: steps before a trial can be stopped.")
    reduction_factor: float = Field(3, gt=1)
    interval_steps: int = Field(50, ge=1, description="pbt/pb2: steps between exploit/explore.")
    quantile: float = Field(0.25, gt=0, le=0.5)
    synch: bool = Field(
        True, description="pbt/pb2: trials meet at every interval (Tune's synch PBT), so each "
        "exploit finds the donor's checkpoint of that interval. false: asynchronous PBT, which "
        "skips an exploit whose donor ran ahead (measured here with few trials on 2 cores).")
    mutate: dict[str, Any] = Field(
        default_factory=dict, description="pbt/pb2: spec paths to change during training, as "
        "domains ({loguniform: [1e-4, 1e-2]}); default: the space's train.lr and "
        "train.batch_size.")


class SearchSpec(Section):
    searcher: Literal["evolution", "rl", "random", "tpe"] = Field(
        "evolution", description="evolution (regularized), rl (REINFORCE controller), random, "
        "or tpe (Optuna's TPE through Tune's OptunaSearch, the reference).")
    num_trials: int = Field(16, ge=1)
    max_concurrent: int = Field(2, ge=1)
    metric: str = Field("auto", description="A reported metric (val_loss, val_acc); auto: "
                        "val_acc for classifiers, val_loss otherwise.")
    mode: Literal["min", "max", "auto"] = "auto"
    seed: int = 0
    space: dict[str, Any] = Field(
        default_factory=dict, description="Hyperparameters: spec path -> domain, e.g. "
        "train.lr: {loguniform: [1.0e-4, 1.0e-2]}.")
    arch: ArchSpaceSpec | None = None
    trial: dict[str, Any] = Field(
        default_factory=lambda: {"cluster.num_workers": 1}, description="Spec paths set for "
        "every trial (its budget: train.max_steps, ...). One worker runs in the trial process; "
        "more run a TorchTrainer inside the trial.")
    @field_validator("trial", mode="before")
    @classmethod
    def _flatten_trial(cls, value: Any) -> Any:
        # `--set search.trial.train.max_steps=100` arrives nested: {"train": {"max_steps": 100}}
        if not isinstance(value, dict):
            return value
        flat: dict[str, Any] = {}

        def walk(node: dict[str, Any], prefix: str) -> None:
            for key, item in node.items():
                if isinstance(item, dict):
                    walk(item, f"{prefix}{key}.")
                else:
                    flat[f"{prefix}{key}"] = item

        walk(value, "")
        return flat

    reevaluate: float = Field(
        0.04, ge=0, lt=1, description="evolution and rl: the fraction of num_trials (rounded "
        "down), at the end of the search, that re-trains the best challengers (never the "
        "incumbent) with a new train.seed: a second measurement of the points most likely to "
        "be the best, since one run's metric moves with its seed (4 of 100 trials: chosen on "
        "NAS-Bench-201, BENCHMARKS.md 5). 0: every trial a new point.")
    objectives: list[Literal["params", "flops", "latency_ms"]] = Field(
        default_factory=lambda: ["params", "latency_ms"],
        description="Costs the Pareto fronts weigh the metric against.")
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    evolution: EvolutionOptions = Field(default_factory=EvolutionOptions)
    rl: RLOptions = Field(default_factory=RLOptions)

    def problems(self, spec: JobSpec) -> list[tuple[str, str]]:
        return search_problems(spec)


#: where a re-evaluation puts its new seed: the trial's own training seed
SEED_PATH = "train.seed"


def reevaluations(search: SearchSpec) -> int:
    """How many of the last trials re-train a challenger (evolution and rl only)."""
    if search.searcher not in ("evolution", "rl"):
        return 0
    return int(search.num_trials * search.reevaluate)


def search_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """A search section's rules: domains well formed, every path a real spec field, the
    architecture space fits the data, the scheduler fits the searcher."""
    from bigopt.data.spec import TEXT_SOURCES
    from bigopt.sections import SpecError
    from bigopt.spec import with_values

    search = spec.search
    if search is None:
        return []
    problems: list[tuple[str, str]] = []
    if spec.model is None:
        problems.append(("model", "the search stage needs a model section (the base every "
                         "trial's architecture and hyperparameters change)"))
    if spec.train is None:
        problems.append(("train", "the search stage needs a train section (trials train)"))
    if not search.space and search.arch is None:
        problems.append(("search.space", "nothing to search: add hyperparameters or search.arch"))
    probe: dict[str, Any] = {}
    for group, entries in (("space", search.space), ("scheduler.mutate", search.scheduler.mutate)):
        for path, domain in entries.items():
            why = domain_problem(domain)
            if why:
                problems.append((f"search.{group}.{path}", why))
            else:
                (kind, args), = domain.items()
                probe[path] = args[0]
    for field_path in {**probe, **search.trial}:
        if field_path.split(".")[0] in ("search", "name", "storage", "data"):
            problems.append((f"search.space.{field_path}", "a trial may change cluster, model "
                             "and train fields only"))
    if problems or spec.model is None or spec.train is None:
        return problems
    try:
        with_values(spec.model_copy(update={"search": None}), {**probe, **search.trial})
    except SpecError as exc:
        problems += [(f"search.space.{p}" if p.split(".")[0] in ("train", "model", "cluster")
                      else p, m) for p, m in exc.problems]
    if search.arch is not None and spec.data is not None:
        images = not isinstance(spec.data.source, TEXT_SOURCES)
        wrong = [f for f in search.arch.families if (f == "gpt") == images]
        if wrong:
            problems.append(("search.arch.families", f"{wrong} cannot read this data source "
                             f"({'images: cnn, mlp' if images else 'text: gpt'})"))
    problems += _scheduler_problems(search, spec)
    if reevaluations(search) and SEED_PATH in search.space:
        problems.append(("search.reevaluate", f"re-evaluations set {SEED_PATH}, which "
                         f"search.space.{SEED_PATH} searches: set search.reevaluate: 0"))
    e = search.evolution
    if "fresh" in e.model_fields_set and e.fresh >= e.candidates > 1:  # the default adapts
        problems.append(("search.evolution.fresh", f"{e.fresh} >= candidates {e.candidates}: "
                         "at least one candidate must be a child"))
    if search.evolution.tournament > search.evolution.population:
        problems.append(("search.evolution.tournament",
                         f"{search.evolution.tournament} > population {search.evolution.population}"))
    if search.metric not in ("auto", "val_loss", "val_acc", "loss"):
        problems.append(("search.metric", f"{search.metric!r}: trials report val_loss, val_acc "
                         "(classifiers) and loss"))
    return problems


def _scheduler_problems(search: SearchSpec, spec: JobSpec) -> list[tuple[str, str]]:
    """A scheduler and a setup it cannot serve: each problem names both fields."""
    s, kind = search.scheduler, search.scheduler.kind
    if kind in ("fifo", "asha"):  # asha stops trials early: any searcher, any trial budget
        return []
    problems: list[tuple[str, str]] = []
    trial_steps = search.trial.get("train.max_steps", spec.train.max_steps if spec.train else None)
    if search.searcher != "random":
        problems.append(("search.searcher", f"{search.searcher} cannot run beside "
                         f"search.scheduler.kind {kind}: {kind} draws its own starting population "
                         "(Tune refuses a searcher beside it); use random"))
    if search.num_trials < 2:
        problems.append(("search.num_trials", f"{search.num_trials}: search.scheduler.kind {kind} "
                         "needs at least 2 trials (a trial exploits another's checkpoint)"))
    if isinstance(trial_steps, int) and s.interval_steps >= trial_steps:
        problems.append(("search.scheduler.interval_steps", f"{s.interval_steps} >= the trials' "
                         f"train.max_steps {trial_steps} (search.trial): {kind} would never "
                         "exploit; make the interval shorter than a trial"))
    mutate = s.mutate or {p: d for p, d in search.space.items()
                          if p in ("train.lr", "train.batch_size")}
    if not mutate:
        problems.append(("search.scheduler.mutate", f"search.scheduler.kind {kind} needs values "
                         "to change during training: none given, and search.space has neither "
                         "train.lr nor train.batch_size to take them from"))
    if kind == "pb2":
        for path, domain in mutate.items():
            if isinstance(domain, dict) and next(iter(domain), None) == "choice":
                where = "scheduler.mutate" if s.mutate else "space"
                problems.append((f"search.{where}.{path}", "search.scheduler.kind pb2 fits a "
                                 "GP to numeric ranges: give a range (uniform, loguniform, ...), "
                                 "not a choice"))
    return problems
