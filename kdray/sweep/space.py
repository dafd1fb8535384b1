"""Search spaces: a fixed run config plus Optuna distributions, with a conditional knowledge-type choice.

A search space YAML has a fixed part (``base``: data set, teacher, student, training, resources per
trial) and a ``space``:

.. code-block:: yaml

    space:
      train.lr: {type: float, low: 3.0e-4, high: 3.0e-3, log: true}   # any dotted path of the run config
      knowledge:                       # the knowledge type: a categorical whose choices carry sub-spaces
        none: {}                       # labels only: always a choice (added if missing)
        kd:
          kd.temperature: {type: float, low: 1, high: 20, log: true}
          kd.weight: {type: float, low: 0.1, high: 10, log: true}
          ce_weight: {type: float, low: 0.1, high: 1.0}
        kd+at:                         # combinations: every type's parameters, prefixed by the type
          kd.temperature: 4            # a plain value is fixed
          at.weight: {type: float, low: 100, high: 10000, log: true}

Distributions use Optuna's vocabulary (``float``/``int`` with ``low``, ``high``, ``log``, ``step``;
``categorical`` with ``choices``). Parameters of a choice are named ``<choice>:<key>`` in Optuna, so
the same key under two choices never clashes.
"""
from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from kdray.config import (
    PLUGINS_FIELD,
    ConfigError,
    RunConfig,
    Strict,
    dotted_set,
    import_config_plugins,
    pydantic_errors,
    read_yaml,
)
from kdray.goal import GOALS, Goal, goal_of
from kdray.knowledge import KNOWLEDGE
from kdray.sweep.distributions import (  # noqa: F401 (Distribution and parse_value: re-exported)
    Distribution,
    SchedulerConfig,
    SearcherConfig,
    chain_stages,
    parse_value,
)

NONE = "none"
# Cache settings a language-model trial may search: what it reads of the sweep's top-k cache (kdray.cache.tokens).
SEARCHABLE_CACHE = ("cache.top_k", "cache.tail")
# Schemes that may stand in a knowledge choice's name: `dml` (peers teach each other, no teacher; its peers in
# `scheme.peers`), `born_again+kd` (generations of kd, `scheme.generations` of them), `on_policy+tkd` (a language
# model's own samples, `scheme.lmbda` of the batches), `seq_kd` or `seq_kd+tkd` (the teacher's answers as the data),
# `assistant+kd` (teacher assistants, `scheme.chain`).
SCHEMES = ("dml", "born_again", "on_policy", "seq_kd", "assistant")


class SearchSpace(Strict):
    """A sweep definition: what is fixed, what is searched, how, and where the champion goes."""

    plugins: list[str] = PLUGINS_FIELD
    name: str = Field(description="the MLflow experiment of this space (one experiment per search space)")
    description: str = ""
    metric: Literal["val_accuracy", "val_nll", "val_exact_match"] = Field(
        "val_accuracy", description="what selects: val_accuracy (maximised; classifiers' default), val_nll (nats "
                                    "per target token, minimised; language models' default) or val_exact_match "
                                    "(greedy answers exactly right, maximised; data sets of prompt/answer rows)")
    mode: Literal["max", "min"] | None = Field(None, description="the metric's direction (default: its own)")
    objectives: list[Literal["val_accuracy", "val_nll", "val_exact_match", "latency_ms", "latency_b64_ms",
                             "student_params"]] = Field(
        default_factory=list,
        description="[metric] or [metric, <cost>]: with a cost (latency_ms at batch 1, latency_b64_ms, "
                    "student_params; minimised) the search is multi-objective and the sweep reports the Pareto front")
    min_trials_per_type: int = Field(
        2, ge=0, description="fair budget: full-length trials every knowledge choice gets before ASHA may abandon "
                             "it; the first trials go round-robin over the choices (0: off)")
    num_samples: int = Field(16, ge=1, description="trials of the sweep")
    seed: int = Field(0, description="seed of the sampler (same seed + space -> same proposals)")
    max_concurrent: int | None = Field(None, ge=1, description="default: as many as the cluster's CPUs/GPUs fit")
    register_as: str | None = Field(None, description="registered model name (default kdray-<name>)")
    base: dict[str, Any] = Field(description="the fixed part: a run config (dataset, teacher, student, ...)")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    searcher: SearcherConfig = Field(default_factory=SearcherConfig)
    space: dict[str, Any] = Field(default_factory=dict)

    _plugins = model_validator(mode="before")(import_config_plugins)

    @model_validator(mode="after")
    def _absolute_paths(self) -> "SearchSpace":
        """Files named in ``base`` (data, tokenizers, ``hf/./folder`` models) made absolute against this file while
        it is being read: trials validate their config in other folders, on other machines."""
        from kdray.config import PATH_OPTIONS, absolute_dir, absolute_hf_name, local_path

        dataset = self.base.get("dataset")
        if isinstance(dataset, dict) and dataset.get("data_dir"):
            dataset["data_dir"] = absolute_dir(dataset["data_dir"])
        if isinstance(dataset, dict):
            for holder in (dataset, dataset.get("options")):
                if isinstance(holder, dict):
                    for key in PATH_OPTIONS:
                        if key in holder:
                            holder[key] = local_path(holder[key])
        for path in (("student",), ("teacher",), ("teacher", "train", "model")):
            node: Any = self.base
            for part in path:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict) and "name" in node:
                node["name"] = absolute_hf_name(node["name"])
        return self

    # parsed forms, set by the validator (private: not settable from YAML)
    _params: dict[str, Any] = PrivateAttr(default_factory=dict)
    _choices: dict[str, dict[str, Any]] = PrivateAttr(default_factory=dict)
    _check_report: list[str] = PrivateAttr(default_factory=list)

    @property
    def check_report(self) -> list[str]:
        return self._check_report

    @property
    def params(self) -> dict[str, Distribution | Any]:
        """Run-level parameters: dotted config path -> distribution or fixed value."""
        return self._params

    @property
    def choices(self) -> dict[str, dict[str, Distribution | Any]]:
        """Knowledge choice (``none``, ``kd``, ``kd+at``) -> its sub-space."""
        return self._choices

    @model_validator(mode="after")
    def _objectives(self) -> "SearchSpace":
        lm = self._language_model()
        if "metric" not in self.model_fields_set and lm:
            self.metric = "val_nll"  # a language model's sweep selects on validation NLL unless told otherwise
        if self.metric == "val_nll" and not lm:
            raise ConfigError([("metric", "val_nll is a language model's metric (next-token NLL); this space's data "
                                          "set is a classifier's: use val_accuracy")])
        if self.metric == "val_exact_match" and not self._prompt_rows():
            raise ConfigError([("metric", "val_exact_match needs a data set of prompt/answer rows (lm_tasks): this "
                                          "space's data set has no fixed prompt to complete")])
        own = goal_of(self.metric).mode
        if self.mode is None:
            self.mode = own
        elif self.mode != own:
            raise ConfigError([("mode", f"{self.metric} is {'maximised' if own == 'max' else 'minimised'}: mode "
                                        f"{own}, not {self.mode}")])
        v = self.objectives or [self.metric]
        if v[0] != self.metric:
            raise ConfigError([("objectives", f"the first objective is the metric, {self.metric}; a second one is a "
                                              "cost (minimised)")])
        if len(v) > 2:
            raise ConfigError([("objectives", f"at most two objectives (the metric and one cost), got {len(v)}")])
        if len(set(v)) != len(v):
            raise ConfigError([("objectives", f"an objective appears twice: {v}")])
        if len(v) == 2 and v[1] in GOALS:
            raise ConfigError([("objectives", f"the second objective is a cost (latency_ms, latency_b64_ms, "
                                              f"student_params), not {v[1]}")])
        strategy = (self.base.get("resources") or {}).get("strategy")
        if len(v) == 2 and v[1].startswith("latency") and strategy == "fsdp":
            raise ConfigError([("objectives", f"{v[1]}: a sharded student's latency is not measured (timing it whole "
                                              "on one CPU thread would hold up the other ranks); use student_params")])
        self.objectives = list(v)
        return self

    @property
    def goal(self) -> Goal:
        return goal_of(self.metric)

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def modes(self) -> list[str]:
        """Optuna's direction of every objective: the metric's own, costs down."""
        return [self.goal.mode] + ["min"] * (len(self.objectives) - 1)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "-_." for c in v):
            raise ValueError("use letters, digits, '-', '_' and '.' only")
        return v

    @model_validator(mode="after")
    def _parse(self) -> "SearchSpace":
        errors: list[tuple[str, str]] = []
        if "knowledge" in self.base:
            errors.append(("base.knowledge", "the knowledge types are chosen by `space.knowledge`, not fixed in base"))
        params: dict[str, Any] = {}
        for key, raw in self.space.items():
            if key == "knowledge":
                continue
            try:
                params[key] = parse_value(raw)
            except ValidationError as e:
                errors.extend(pydantic_errors(e, Distribution, ("space", key)))
        raw_choices = self.space.get("knowledge") or {}
        if not isinstance(raw_choices, dict):
            errors.append(("space.knowledge",
                           "expected a mapping from knowledge type (kd, kd+at, none) to its sub-space"))
            raw_choices = {}
        choices: dict[str, dict[str, Any]] = {}
        for choice, sub in raw_choices.items():
            where = f"space.knowledge.{choice}"
            types = str(choice).split("+")
            if choice != NONE:
                bad = [t for t in types if t not in KNOWLEDGE and t not in SCHEMES]
                if bad:
                    errors.append((where, KNOWLEDGE.unknown_message(bad[0]) + f" (or a scheme: {', '.join(SCHEMES)})"))
                    continue
                if len(set(types)) != len(types):
                    errors.append((where, "a knowledge type appears twice in this combination"))
                    continue
                if "dml" in types and types != ["dml"]:
                    errors.append((where, "dml trains peers without a teacher: it takes no knowledge types"))
                    continue
                if types in (["born_again"], ["assistant"]):
                    errors.append((where, f"{types[0]} passes knowledge from model to model: combine it with "
                                          f"knowledge types, e.g. {types[0]}+kd"))
                    continue
                if types == ["on_policy"]:
                    errors.append((where, "on_policy trains on the student's samples scored by the teacher: "
                                          "combine it with a token-level type, e.g. on_policy+tkd"))
                    continue
                if len([t for t in types if t in SCHEMES]) > 1:
                    errors.append((where, "one scheme per choice: " + ", ".join(t for t in types if t in SCHEMES)))
                    continue
            sub = sub or {}
            if not isinstance(sub, dict):
                errors.append((where, "expected a mapping of parameters (or {} for defaults)"))
                continue
            parsed = {}
            for key, raw in sub.items():
                key = str(key)
                head = key.split(".", 1)[0]
                ktypes = [t for t in types if t not in SCHEMES]  # born_again+kd: one knowledge type
                if (choice != NONE and "." not in key and len(ktypes) == 1
                        and key in KNOWLEDGE.get(ktypes[0]).Params.model_fields):
                    key = f"{ktypes[0]}.{key}"  # shorthand inside a single-type choice: `temperature`
                elif choice != NONE and head in KNOWLEDGE and head not in types:
                    errors.append((f"{where}.{key}", f"{head!r} is not part of the choice {choice!r}"))
                    continue
                try:
                    parsed[key] = parse_value(raw)
                except ValidationError as e:
                    errors.extend(pydantic_errors(e, Distribution, ("space", "knowledge", choice, key)))
            choices[str(choice)] = parsed
        errors.extend(self._unsupported_keys(params, choices))
        if self.multi_objective and self.scheduler.type == "asha":
            errors.append(("scheduler.type", "ASHA stops trials on one metric, which would stop the small, fast "
                                             f"students a front of {' and '.join(self.objectives)} needs; use "
                                             "scheduler: {type: fifo} with two objectives"))
        errors.extend(self._token_budget_errors(params, choices))
        if choices and NONE not in choices:
            choices = {NONE: {}, **choices}  # every sweep measures what distillation gains
        if not choices:
            choices = {NONE: {}}
        if errors:
            raise ConfigError(errors)
        self._params, self._choices = params, choices
        return self

    def _unsupported_keys(self, params: dict[str, Any], choices: dict[str, dict[str, Any]]) -> list[tuple[str, str]]:
        """Keys a sweep cannot honour per trial: refused here rather than silently ignored."""
        errors = []
        where = [(f"space.{k}", k, v) for k, v in params.items()]
        where += [(f"space.knowledge.{c}.{k}", k, v) for c, sub in choices.items() for k, v in sub.items()]
        for field, key, value in where:
            if key.split(".", 1)[0] == "resources":
                errors.append((field, "resources are fixed for a whole sweep (Tune reserves them and sizes its "
                                      "concurrency from them); set them in base.resources"))
            elif key in SEARCHABLE_CACHE and self._language_model():
                continue  # what a trial reads of the shared top-k cache (it holds the largest k any trial needs)
            elif key.split(".", 1)[0] == "cache":
                errors.append((field, "the teacher-output cache is one for the whole sweep (built before any trial, "
                                      "shared by all), so a trial's own cache settings would be ignored; set them in "
                                      "base.cache"))
            elif (key in ("train.epochs", "scheme.generations", "scheme.chain") and isinstance(value, Distribution)
                  and self.scheduler.type == "asha"):
                errors.append((field, f"ASHA compares trials at the same epochs over one max_t, so {key} "
                                      "cannot be searched with scheduler asha; use scheduler: {type: fifo} or fix "
                                      f"{key} in base"))
        return errors

    def _token_budget_errors(self, params: dict[str, Any], choices: dict[str, dict[str, Any]]
                             ) -> list[tuple[str, str]]:
        """``scheduler.unit: tokens`` counts what a language model's trial trains on and generates, at ASHA's rungs."""
        if self.scheduler.unit != "tokens":
            return []
        if self.scheduler.type != "asha":
            return [("scheduler.unit", "tokens sets where ASHA's rungs are; scheduler fifo has none")]
        if not self._language_model():
            return [("scheduler.unit", "tokens counts a language model's target and generated tokens; this data "
                                       "set is a classifier's: use epochs")]
        base = self.base.get("scheme") or {}
        staged = base.get("type") in ("born_again", "assistant") or any(
            t in ("born_again", "assistant") for c in choices for t in str(c).split("+"))
        if staged or int(base.get("generations", 1) or 1) > 1:
            return [("scheduler.unit", "born-again generations and assistant chains report several students as one "
                                       "run, whose tokens are not counted across them yet: use epochs")]
        return []

    def uses_scheme(self, scheme: str) -> bool:
        """Whether some trial of this space runs ``scheme`` (a choice names it, or the base sets it)."""
        return (self.base.get("scheme") or {}).get("type") == scheme or any(
            scheme in str(c).split("+") for c in self.choices)

    def _prompt_rows(self) -> bool:
        """Whether the base data set is rows of prompt + answer (``val_exact_match`` is measured on it)."""
        from kdray.config import DatasetConfig
        from kdray.data import describe_dataset

        try:
            return bool(describe_dataset(DatasetConfig.model_validate(self.base.get("dataset") or {})).prompt_len)
        except Exception:  # noqa: BLE001 - an unreadable data set is reported where the trials are validated
            return False

    def _language_model(self) -> bool:
        """Whether the base data set is for causal language models (token-level cache settings are per trial)."""
        from kdray.config import DatasetConfig
        from kdray.data import describe_dataset

        try:
            return describe_dataset(DatasetConfig.model_validate(self.base.get("dataset") or {})).causal_lm
        except Exception:  # noqa: BLE001 - an unreadable data set is reported where the trials are validated
            return False

    # -- trials ------------------------------------------------------------------------------------
    @property
    def max_epochs(self) -> int:
        """The longest trial's epochs (ASHA's max_t): born-again trials report their generations as one run, and a
        teacher-assistant trial its chain's stages then the student's."""
        epochs = self._resolve({"knowledge": NONE}).train.epochs
        base = self.base.get("scheme") or {}
        generations = [base.get("generations", 1), self.params.get("scheme.generations", 1)]
        generations += [d for sub in self.choices.values() for k, d in sub.items() if k == "scheme.generations"]
        chains = [base.get("chain"), self.params.get("scheme.chain")]
        chains += [d for sub in self.choices.values() for k, d in sub.items() if k == "scheme.chain"]
        stages = [n for c in chains for n in chain_stages(c)]
        return epochs * max([int(g) for g in generations if not isinstance(g, Distribution)] + stages)

    @property
    def model_name(self) -> str:
        return self.register_as or f"kdray-{self.name}"

    @staticmethod
    def optuna_name(choice: str, key: str) -> str:
        return f"{choice}:{key}"

    def define_by_run(self, trial: Any) -> dict[str, Any]:
        """Optuna define-by-run: the run-level parameters, the knowledge type, then its own sub-space."""
        fixed: dict[str, Any] = {}
        for key, dist in self.params.items():
            if isinstance(dist, Distribution):
                dist.suggest(trial, key)
            else:
                fixed[key] = dist
        choice = trial.suggest_categorical("knowledge", list(self.choices))
        for key, dist in self.choices[choice].items():
            name = self.optuna_name(choice, key)
            if isinstance(dist, Distribution):
                dist.suggest(trial, name)
            else:
                fixed[name] = dist
        return fixed

    def resolve(self, params: dict[str, Any]) -> RunConfig:
        """The full run config of a trial from its flat parameters (Optuna's names)."""
        return self._resolve(params)

    def resolved_dict(self, params: dict[str, Any]) -> dict[str, Any]:
        choice = params.get("knowledge", NONE)
        if choice not in self.choices:
            raise ValueError(f"knowledge choice {choice!r} is not in this search space")
        data = copy.deepcopy(self.base)
        data.setdefault("name", self.name)
        if self.plugins:  # every trial's config names them: a worker that validates it imports them first
            data["plugins"] = list(dict.fromkeys(self.plugins + list(data.get("plugins") or [])))
        types = [] if choice == NONE else choice.split("+")
        if "dml" in types:  # peers teach each other: no teacher
            data.pop("teacher", None)
            data["scheme"] = {**(data.get("scheme") or {}), "type": "dml"}
        elif any(t in SCHEMES for t in types):  # born_again, on_policy, seq_kd
            data["scheme"] = {**(data.get("scheme") or {}), "type": next(t for t in types if t in SCHEMES)}
        types = [t for t in types if t not in SCHEMES]
        kparams: dict[str, dict[str, Any]] = {t: {} for t in types}
        values = {k: v for k, v in params.items() if k != "knowledge"}
        for key, dist in self.params.items():  # fixed run-level values are not in Optuna's params
            values.setdefault(key, dist)
        for key, dist in self.choices[choice].items():
            values.setdefault(self.optuna_name(choice, key), dist)
        for name, value in values.items():
            if isinstance(value, Distribution):
                continue
            key = name.split(":", 1)[1] if ":" in name else name
            if ":" in name and name.split(":", 1)[0] != choice:
                continue  # a parameter of another choice (can only come from a hand-written point)
            head = key.split(".", 1)[0]
            if head in kparams and "." in key:
                kparams[head][key.split(".", 1)[1]] = value
            else:
                dotted_set(data, key, value)
        data["knowledge"] = [{"type": t, **kparams[t]} for t in types]
        return data

    def _resolve(self, params: dict[str, Any]) -> RunConfig:
        return RunConfig.model_validate(self.resolved_dict(params))

    def representative_points(self) -> list[dict[str, Any]]:
        """Trial parameters that exercise every choice and both ends of every range (for validation)."""
        points = []
        run_dists = {k: d for k, d in self.params.items() if isinstance(d, Distribution)}
        run_axes = [[(k, v) for v in d.extremes()] for k, d in run_dists.items()]
        run_corners = [dict(c) for c in itertools.product(*run_axes)][:8] or [{}]
        for choice, sub in self.choices.items():
            dists = {self.optuna_name(choice, k): d for k, d in sub.items() if isinstance(d, Distribution)}
            axes = [[(k, v) for v in d.extremes()] for k, d in dists.items()]
            corners = [dict(c) for c in itertools.product(*axes)] if axes else [{}]
            if len(corners) > 16:  # many parameters: both all-low and all-high, plus every categorical alone
                corners = [dict((k, d.extremes()[i if d.type != "categorical" else 0]) for k, d in dists.items())
                           for i in (0, -1)]
                for k, d in dists.items():
                    if d.type == "categorical":
                        for c in d.choices:
                            corners.append({**corners[0], k: c})
            for rc in run_corners[:1] if len(corners) > 1 else run_corners:
                for c in corners:
                    points.append({"knowledge": choice, **rc, **c})
        return points

    def grid_points(self) -> list[dict[str, Any]]:
        """The full grid for the grid searcher: every choice x ``grid_points`` values per parameter."""
        n = self.searcher.grid_points
        run_axes = [[(k, v) for v in d.grid(n)] for k, d in self.params.items() if isinstance(d, Distribution)]
        points = []
        for choice, sub in self.choices.items():
            axes = [[(self.optuna_name(choice, k), v) for v in d.grid(n)] for k, d in sub.items()
                    if isinstance(d, Distribution)]
            for combo in itertools.product(*run_axes, *axes):
                points.append({"knowledge": choice, **dict(combo)})
        return points

    def validate_trials(self, file: str | Path | None = None) -> list[RunConfig]:
        """Resolve the representative points: every parameter name and range is checked by RunConfig."""
        configs = []
        for point in self.representative_points():
            try:
                configs.append(self._resolve(point))
            except ConfigError as e:
                raise ConfigError([(self._field_for(point, f), m) for f, m in e.errors], file) from None
            except ValidationError as e:
                raise ConfigError([(self._field_for(point, f), m) for f, m in pydantic_errors(e, RunConfig)],
                                  file) from None
        return configs

    def _field_for(self, point: dict[str, Any], run_field: str) -> str:
        """Map a field of a resolved run config back to where the search space sets it."""
        choice = point.get("knowledge", NONE)
        parts = run_field.split(".")
        if parts[0] == "knowledge" and len(parts) >= 2 and parts[1].isdigit():
            types = [] if choice == NONE else [t for t in choice.split("+") if t not in SCHEMES]
            idx = int(parts[1])
            if idx < len(types):
                key = f"{types[idx]}.{parts[2]}" if len(parts) > 2 else types[idx]
                if len(parts) > 2 and key in self.choices[choice]:
                    return f"space.knowledge.{choice}.{key}"
                return f"space.knowledge.{choice}" + (f" ({key})" if len(parts) > 2 else "")
        if run_field in self.params:
            return f"space.{run_field}"
        if run_field in self.choices.get(choice, {}):
            return f"space.knowledge.{choice}.{run_field}"
        return f"base.{run_field}"


def load_space(path: str | Path) -> SearchSpace:
    """Read, validate and resolve every representative trial of a search space (no models built)."""
    from kdray.config import validate

    space: SearchSpace = validate(SearchSpace, read_yaml(path), path)
    space.validate_trials(path)
    return space


def check_space(path: str | Path, capacity: dict[str, float] | None = None,
                tracking_uri: str | None = None) -> SearchSpace:
    """``kdray check``: validate the space, then dry-run the shapes of every representative trial."""
    from kdray.check import check_resources, dry_run
    from kdray.teachers import load_teacher_records

    space = load_space(path)
    configs = space.validate_trials(path)
    points = space.representative_points()
    records = None
    seen: set[str] = set()
    report: list[str] = []
    for point, cfg in zip(points, configs):
        try:
            check_resources(cfg, capacity, where="base.resources")
        except ConfigError as e:
            raise ConfigError(e.errors, path) from None
        if records is None and cfg.teacher and cfg.teacher.ready_made:
            try:
                records = load_teacher_records(cfg, tracking_uri=tracking_uri)
            except ConfigError as e:
                raise ConfigError([(f"base.{f}", m) for f, m in e.errors], path) from None
        try:
            dr = dry_run(cfg, teacher_records=records)
        except ConfigError as e:
            raise ConfigError([(space._field_for(point, f), m) for f, m in e.errors], path) from None
        key = repr(dr.lines())
        if key not in seen:
            seen.add(key)
            report.extend(dr.lines())
    space._check_report = [f"  {len(points)} representative trials dry-run, {len(space.choices)} knowledge "
                          f"choices: {', '.join(space.choices)}"] + ["  " + line for line in report]
    return space
