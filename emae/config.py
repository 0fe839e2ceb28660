"""Typed, validated configuration: one tree loaded from `params/*.yaml` (+ a preset) + overrides.

Every tunable number lives in the YAML files under `params/`; the models below only say what
each key is and which values are allowed, so they have no numeric defaults. A config is validated
completely before any work starts, and a bad value is reported with the file that set it, the key,
the value and what is allowed.

Loading order (later wins): the files of `--params` (a directory means all its `*.yaml`, sorted),
then `params/presets/<preset>.yaml` when a preset is chosen, then `key=value` overrides.
"""

from __future__ import annotations

import argparse
import copy
import functools
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from emae.errors import ConfigError
from emae.patches import allowed_num_parts, num_visible  # not emae.masking: no torch for configs

# Adam's (beta1, beta2): each in [0, 1)
Beta = Annotated[float, Field(ge=0, lt=1)]
Betas = tuple[Beta, Beta]


# json_schema_extra of a key a resumed run may change: it does not change what is trained. Declared
# here, on the fields, for every resume check (emae.train.checkpoint) and the sweep's signature.
RESUMABLE = {"resumable": True}


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    @classmethod
    def resumable_keys(cls) -> set[str]:
        return {name for name, field in cls.model_fields.items() if field.json_schema_extra == RESUMABLE}


def changed_params(saved: dict[str, dict[str, Any]], now: dict[str, Section]) -> list[str]:
    """'section.key: old -> new' for each key of `now` whose value differs from `saved` (the
    sections' plain dumps, as a checkpoint stores them), resumable keys left out."""
    changed = []
    for name, section in now.items():
        before = saved.get(name, {})
        for key, value in section.model_dump(mode="json").items():
            if key not in section.resumable_keys() and _plain(before.get(key)) != value:
                changed.append(f"{name}.{key}: {before.get(key)!r} -> {value!r}")
    return changed


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


class DataConfig(Section):
    kind: Literal["imagefolder", "cifar10", "cifar100"]
    root: str = Field(description="ImageFolder root with train/ and val/, or the CIFAR download folder",
                      json_schema_extra=RESUMABLE)
    image_size: int = Field(gt=0)
    in_chans: int = Field(gt=0)
    num_classes: int = Field(gt=0)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_scale_min: float = Field(gt=0, le=1, description="RandomResizedCrop lower scale (MAE: 0.2)")
    hflip: bool
    num_workers: int = Field(ge=0, json_schema_extra=RESUMABLE)
    cache_mb: float = Field(0, ge=0, json_schema_extra=RESUMABLE,
                            description="decoded ImageFolder images kept in memory per process, up to this size")
    skip_corrupt: bool = Field(description="skip unreadable images with a warning instead of failing")

    @model_validator(mode="after")
    def _channels(self) -> "DataConfig":
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise ValueError(f"data.mean={list(self.mean)} and data.std={list(self.std)} need "
                             f"data.in_chans={self.in_chans} values each")
        return self


class PrepareConfig(Section):
    source: Literal["digits"] = Field(description="the embedded data set written by `emae prepare`")
    val_fraction: float = Field(gt=0, lt=1)
    seed: int


class ModelConfig(Section):
    patch_size: int = Field(gt=0)
    embed_dim: int = Field(gt=0)
    depth: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    decoder_embed_dim: int = Field(gt=0)
    decoder_depth: int = Field(gt=0)
    decoder_num_heads: int = Field(gt=0)
    mlp_ratio: float = Field(gt=0)
    norm_pix_loss: bool
    mask_ratio: float = Field(gt=0, lt=1)
    num_parts: int = Field(gt=0, description="K: masked views per image with disjoint visible sets")
    consistency_weight: float = Field(ge=0, description="lambda of the self-consistency loss")
    consistency_distance: Literal["l1", "mse"]
    grad_checkpointing: bool

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelConfig":
        for dim, heads, name in (
            (self.embed_dim, self.num_heads, "embed_dim"),
            (self.decoder_embed_dim, self.decoder_num_heads, "decoder_embed_dim"),
        ):
            if dim % heads:
                head_key = "num_heads" if name == "embed_dim" else "decoder_num_heads"
                raise ValueError(f"model.{name}={dim} is not divisible by model.{head_key}={heads}")
        return self


class PretrainConfig(Section):
    epochs: int = Field(gt=0, description="the schedule's length (and warmup_epochs' reference) "
                        "when no budget is set; more on resume extend a run", json_schema_extra=RESUMABLE)
    budget_flops: float | None = Field(default=None, gt=0, description="pre-training budget in "
                                       "analytic training FLOPs (emae.flops); epochs are fitted to it")
    budget_images: int | None = Field(default=None, gt=0, description="budget in images seen")
    batch_size: int = Field(gt=0, description="images per device per step (each gives K views)")
    accum_iter: int | None = Field(gt=0, description="micro-batches per step; null: derived from "
                                   "effective_batch_size and the number of processes")
    effective_batch_size: int | None = Field(gt=0, description="images per optimizer step over all "
                                             "processes (the recipe's batch); null: what results")
    blr: float = Field(gt=0, description="lr = blr * effective batch / 256")
    schedule: Literal["cosine", "constant"] = Field(
        description="after the warm-up: cosine: MAE's half cosine to min_lr; constant: the peak lr "
                    "to the end (min_lr unused)")
    min_lr: float = Field(ge=0)
    warmup_epochs: float = Field(ge=0)
    weight_decay: float = Field(ge=0)
    betas: Betas
    clip_grad: float | None = Field(gt=0, description="max grad norm, or null for none")
    amp: Literal["auto", "bf16", "fp16", "off"] = Field(
        description="auto: bf16 on CUDA and on CPUs with native bf16 (AMX, AVX512-BF16), else off")
    compile: bool
    seed: int
    checkpoint_every_steps: int = Field(gt=0, json_schema_extra=RESUMABLE)
    log_every_steps: int = Field(gt=0, json_schema_extra=RESUMABLE)
    knn_every_epochs: int = Field(ge=0, description="kNN monitor every N epochs; 0 = off",
                                  json_schema_extra=RESUMABLE)
    deterministic: bool

    @model_validator(mode="after")
    def _one_budget(self) -> PretrainConfig:
        if self.budget_flops is not None and self.budget_images is not None:
            raise ValueError(f"pretrain.budget_flops={self.budget_flops:g} and pretrain.budget_images="
                             f"{self.budget_images} are both set: give one budget (or neither: epochs)")
        return self


def effective_batch(cfg: BaseModel, section: str, world_size: int) -> tuple[int, int]:
    """(accum_iter, effective batch) of a training section run by `world_size` processes.

    The recipe's batch is stated once, as `effective_batch_size`; `accum_iter: null` derives the
    accumulation from it, the per-device batch and the process count the launcher grants. Numbers
    that disagree are an error (before any job: the pipeline checks the launcher's counts).
    """
    accum, target = cfg.accum_iter, cfg.effective_batch_size
    per_step = cfg.batch_size * world_size
    where = f"{section}.batch_size={cfg.batch_size} x {world_size} process(es)"
    if target is None:
        if accum is None:
            raise ConfigError(f"{section}.accum_iter is null (derived), which needs "
                              f"{section}.effective_batch_size to derive it from")
        return accum, per_step * accum
    if target % per_step:
        raise ConfigError(f"{section}.effective_batch_size={target} is not a multiple of {where} = "
                          f"{per_step}: choose a batch_size or a process count that divides it")
    derived = target // per_step
    if accum is not None and accum != derived:
        raise ConfigError(f"{section}.effective_batch_size={target} but {where} x accum_iter={accum} = "
                          f"{per_step * accum}: set {section}.accum_iter={derived}, or null to derive it")
    return derived, target


class Config(Section):
    data: DataConfig
    prepare: PrepareConfig
    model: ModelConfig
    pretrain: PretrainConfig
    # Sections of later stages (evaluation, launcher, sweep, pipeline) are kept as plain mappings
    # here and validated by their own modules, so the core does not depend on them.
    extra: dict[str, Any] = Field(default_factory=dict, exclude=True)
    origin: dict[str, str] = Field(default_factory=dict, exclude=True)  # key -> file that set it

    def section(self, name: str, model: type[BaseModel] | None = None) -> Any:
        """A later stage's section, validated by its model (default: the registered one)."""
        return validate_section(model or section_model(name), self.extra, name, self.origin)

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        if self.data.image_size % self.model.patch_size:
            raise ValueError(
                f"model.patch_size={self.model.patch_size} does not divide data.image_size="
                f"{self.data.image_size}"
            )
        num_patches = self.num_patches
        if num_visible(num_patches, self.model.mask_ratio) < 1:
            raise ValueError(
                f"model.mask_ratio={self.model.mask_ratio} leaves no visible patch of the {num_patches} "
                f"(int(L * (1 - mask_ratio)) = 0): it must be at most {1 - 1 / num_patches:g}"
            )
        allowed = allowed_num_parts(num_patches, self.model.mask_ratio)
        if self.model.num_parts not in allowed:
            raise ValueError(
                f"model.num_parts={self.model.num_parts} is not allowed with model.mask_ratio="
                f"{self.model.mask_ratio} and {num_patches} patches: K must be in "
                f"{allowed.start}..{allowed.stop - 1} (K * int(L * (1 - mask_ratio)) <= L)"
            )
        return self

    @property
    def num_patches(self) -> int:
        return (self.data.image_size // self.model.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        return {**self.model_dump(mode="json"), **copy.deepcopy(self.extra)}


CORE_SECTIONS = ("data", "prepare", "model", "pretrain")

# Sections of later stages: name -> "module:Model". Their modules own their schema; listing them
# here lets `validate_all` check a whole params tree before anything is submitted.
SECTION_MODELS: dict[str, str] = {
    "launcher": "emae.launch.config:LauncherConfig",
    "pipeline": "emae.workflow.config:PipelineConfig",
    "dense_data": "emae.dense.config:DenseDataConfig",
    "detect": "emae.dense.config:DetectConfig",
    "segment": "emae.dense.config:SegmentConfig",
    "knn": "emae.eval.config:KnnConfig",
    "linprobe": "emae.eval.config:LinprobeConfig",
    "finetune": "emae.eval.config:FinetuneConfig",
    "consistency": "emae.eval.config:ConsistencyConfig",
    "visualize": "emae.eval.config:VisualizeConfig",
    "sweep": "emae.sweep.config:SweepConfig",
}


def section_model(name: str) -> type[BaseModel]:
    import importlib

    if name not in SECTION_MODELS:
        raise ConfigError(f"unknown params section {name!r}; known: "
                          f"{', '.join(sorted([*CORE_SECTIONS, *SECTION_MODELS]))}")
    module, cls = SECTION_MODELS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def validate_all(config: "Config") -> dict[str, Any]:
    """Validate every section of the tree (core ones already are); unknown sections are errors."""
    return {name: config.section(name) for name in config.extra}


# ----------------------------------------------------------------------------------- loading


class ParamsLoader(yaml.SafeLoader):
    """The one reader of params YAML (files and override values): the YAML 1.2 core schema.

    PyYAML reads YAML 1.1, where `off`/`on`/`yes`/`no` are booleans (the documented
    `pretrain.amp: off` would be False), `1e-4` is a string, `010` is 8 and `1:30` is 90. Here, as
    in YAML 1.2 (and DVC, which reads the same files), only true/false are booleans, null/~/empty
    are None, numbers are 1.2's, and anything else is the string typed; pydantic's lax mode still
    takes "on"/"off"/"yes"/"no" for a bool field. `<<` merge keys work as before.
    """

    yaml_implicit_resolvers: dict[str, list[tuple[str, Any]]] = {}

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        text = self.construct_scalar(node)
        if text[:2] in ("0o", "0x"):
            return int(text[2:], 8 if text[1] == "o" else 16)
        return int(text, 10)  # "010" is 10

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        text = self.construct_scalar(node)
        if text.lower().lstrip("+-") in (".inf", ".nan"):
            return float(text.lower().replace(".", ""))
        return float(text)


_YAML_12_CORE = [  # (tag, pattern, first characters); int before float: "10" is an int
    ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", list("tTfF")),
    ("int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", list("-+0123456789")),
    ("float", r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
              r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", list("-+.0123456789")),
    ("merge", r"^(?:<<)$", ["<"]),
]
for _tag, _pattern, _first in _YAML_12_CORE:
    ParamsLoader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(_pattern), _first)
ParamsLoader.add_constructor("tag:yaml.org,2002:int", ParamsLoader.construct_yaml_int)
ParamsLoader.add_constructor("tag:yaml.org,2002:float", ParamsLoader.construct_yaml_float)

_MERGE_TAG = "tag:yaml.org,2002:merge"


class ParamsDumper(yaml.SafeDumper):
    """The writer of params YAML (config.yaml): a string that YAML 1.1 or 1.2 would read as
    something else (off, 1.0e5, 0o7) is quoted, so both ParamsLoader and other readers read back
    what was written."""


for _tag, _pattern, _first in _YAML_12_CORE:
    ParamsDumper.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(_pattern), _first)


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=ParamsDumper, sort_keys=False)


def load_yaml(text: str, source: str, prefix: str = "") -> Any:
    """`text` read by ParamsLoader. A key given twice in one mapping is an error naming `source`,
    the dotted key (under `prefix`) and both lines: YAML would silently keep the last one."""
    loader = ParamsLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(loader, node, source, prefix, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _refuse_duplicate_keys(loader: ParamsLoader, node: yaml.Node, source: str, prefix: str,
                           seen_nodes: set[int]) -> None:
    if id(node) in seen_nodes:  # an alias: checked where its anchor is
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(loader, item, source, f"{prefix}{i}.", seen_nodes)
    elif isinstance(node, yaml.MappingNode):
        lines: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                _refuse_duplicate_keys(loader, value_node, source, prefix, seen_nodes)
                continue
            key = loader.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in lines:
                raise ConfigError(f"{source}: duplicate key {prefix}{key} on lines {lines[key]} and "
                                  f"{line}: give each key once (YAML would keep the last silently)")
            lines[key] = line
            _refuse_duplicate_keys(loader, value_node, source, f"{prefix}{key}.", seen_nodes)


def read_yaml(path: Path) -> dict[str, Any]:
    """A params file: a mapping of sections (an empty file is an empty one)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the params file: {err.strerror or err}") from None
    return copy.deepcopy(_parse_params_file(text, str(path)))


@functools.lru_cache(maxsize=64)
def _parse_params_file(text: str, source: str) -> dict[str, Any]:
    """Parsed once per process and content: a pipeline reads the same files for every run, and
    PyYAML's parser is most of its start-up CPU. Callers get a deep copy (they merge into it)."""
    try:
        loaded = load_yaml(text, source)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level")
    return loaded


def merge_tree(base: dict[str, Any], update: dict[str, Any], origin: dict[str, str], source: str,
               prefix: str = "") -> None:
    """Deep-merge `update` into `base`, recording in `origin` which source set each leaf key."""
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge_tree(base[key], value, origin, source, dotted + ".")
        else:
            base[key] = copy.deepcopy(value)
            origin[dotted] = source
            if isinstance(value, dict):
                for sub in _leaf_keys(value, dotted + "."):
                    origin[sub] = source


def _leaf_keys(tree: dict[str, Any], prefix: str) -> list[str]:
    keys = []
    for key, value in tree.items():
        keys += _leaf_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return keys


def parse_value(raw: str, source: str, key: str = "") -> Any:
    """An override's value, as params files read it (ParamsLoader): 0.5, true, off (a string),
    null, [1, 2], {a: 1}; text that is not YAML stays the text typed."""
    if not raw.strip():
        return ""
    try:
        return load_yaml(raw, source, f"{key}." if key else "")
    except yaml.YAMLError:
        return raw


def parse_override(text: str, section: str | None = None) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], the value read by parse_value). With `section`,
    the key may leave the section out (the launcher's `kind=slurm` is `launcher.kind=slurm`)."""
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if section and parts[0] != section:
        parts.insert(0, section)
    if not sep or not all(parts) or len(parts) < 2:
        example = "kind=slurm, resources.partition=gpu" if section else "model.num_parts=4"
        raise ConfigError(f"override {text!r}: expected a dotted key=value (e.g. {example})")
    return parts, parse_value(raw, f"override {text!r}", ".".join(parts))


def merge_overrides(tree: dict[str, Any], origin: dict[str, str], overrides: Iterable[str],
                    section: str | None = None) -> None:
    """Apply `section.key=value` overrides to `tree` in place (making the mappings on the way; a
    null one counts as empty), recording each in `origin`."""
    for text in overrides:
        parts, value = parse_override(text, section)
        node = tree
        for i, part in enumerate(parts[:-1]):
            if node.get(part) is None:
                node[part] = {}
            elif not isinstance(node[part], dict):
                raise ConfigError(f"override {text!r}: {'.'.join(parts[:i + 1])} = {node[part]!r} is "
                                  "not a mapping of keys")
            node = node[part]
        node[parts[-1]] = value
        origin[".".join(parts)] = f"override {text!r}"


def param_files(params: list[str | Path], preset: str | None = None) -> list[Path]:
    """The YAML files that `params` (files or directories) and `preset` stand for, in merge order."""
    files: list[Path] = []
    for entry in params:
        path = Path(entry)
        if path.is_dir():
            found = sorted(path.glob("*.yaml"))
            if not found:
                raise ConfigError(f"{path}: no *.yaml params files in this directory")
            files += found
        elif path.exists():
            files.append(path)
        else:
            raise ConfigError(f"{path}: params file or directory not found")
    if preset:
        roots = {p.parent for p in files} or {Path("params")}
        candidates = [root / "presets" / f"{preset}.yaml" for root in sorted(roots)]
        found = [c for c in candidates if c.exists()]
        if not found:
            available = sorted({p.stem for root in roots for p in (root / "presets").glob("*.yaml")})
            raise ConfigError(f"preset {preset!r} not found (looked for {candidates[0]}); "
                              f"available: {', '.join(available) or 'none'}")
        files.append(found[0])
    return files


def load_raw(params: list[str | Path], overrides: list[str] = (), preset: str | None = None
             ) -> tuple[dict[str, Any], dict[str, str]]:
    """Merged params tree and, for each leaf key, the file (or 'override') that set it."""
    tree: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for path in param_files(params, preset):
        merge_tree(tree, read_yaml(path), origin, str(path))
    merge_overrides(tree, origin, overrides)
    return tree, origin


def explain_validation_error(err: ValidationError, origin: dict[str, str], root: str = "") -> str:
    """One line per problem: `file: key = value: what is allowed`."""
    lines = []
    for problem in err.errors():
        loc = [str(p) for p in problem["loc"]]
        key = ".".join(([root] if root else []) + loc)
        source = source_of(key, origin)
        message = problem["msg"]
        if problem["type"] == "missing":
            lines.append(f"{source}: {key} is missing (required)")
        elif problem["type"] == "extra_forbidden":
            lines.append(f"{source}: {key} is not a known key")
        elif isinstance(problem.get("input"), dict):  # a check across keys: its message names them
            message = message.removeprefix("Value error, ")
            if key and key not in message:  # a nested check's message may not say where it is
                message = f"{key}: {message}"
            lines.append(f"{_source_of_message(message, origin, source)}: {message}")
        else:
            lines.append(f"{source}: {key} = {problem.get('input')!r}: {message}")
    return "invalid params:\n  " + "\n  ".join(lines)


def _source_of_message(message: str, origin: dict[str, str], fallback: str) -> str:
    """The source of the keys a cross-key message names (an override wins over a file)."""
    sources = [origin[k] for k in re.findall(r"[a-z_]+\.[a-z_.]+", message) if k in origin]
    overrides = [s for s in sources if s.startswith("override")]
    return (overrides or sources or [fallback])[0]


def source_of(key: str, origin: dict[str, str], default: str = "params") -> str:
    """The file or override that set `key`, or a key above or below it (a section's file)."""
    while key:
        if key in origin:
            return origin[key]
        matches = [src for k, src in origin.items() if k.startswith(key + ".")]
        if matches:
            return sorted(set(matches))[0]
        key = key.rpartition(".")[0]
    return default


def validate_section(model: type[BaseModel], tree: dict[str, Any], name: str,
                     origin: dict[str, str] | None = None) -> Any:
    """Validate one section of the tree with its pydantic model; errors name file, key and value."""
    if name not in tree:
        raise ConfigError(f"{source_of(name, origin or {})}: section {name!r} is missing")
    try:
        return model.model_validate(tree[name])
    except ValidationError as err:
        raise ConfigError(explain_validation_error(err, origin or {}, name)) from None


def load_config(params: list[str | Path], overrides: list[str] = (), preset: str | None = None,
                ) -> Config:
    """Load, merge and validate the core config; other sections are kept in `Config.extra`."""
    tree, origin = load_raw(params, overrides, preset)
    return config_from_tree(tree, origin)


def config_from_tree(tree: dict[str, Any], origin: dict[str, str] | None = None) -> Config:
    core = {k: v for k, v in tree.items() if k in CORE_SECTIONS}
    extra = {k: v for k, v in tree.items() if k not in CORE_SECTIONS}
    unknown = [k for k in extra if k not in SECTION_MODELS]
    if unknown:
        known = ", ".join(sorted([*CORE_SECTIONS, *SECTION_MODELS]))
        raise ConfigError("invalid params:\n  " + "\n  ".join(
            f"{source_of(k, origin or {})}: unknown section {k!r} (known: {known})" for k in unknown))
    try:
        config = Config.model_validate(core)
    except ValidationError as err:
        raise ConfigError(explain_validation_error(err, origin or {})) from None
    config.extra = extra
    config.origin = dict(origin or {})
    return config


def add_config_arguments(parser: argparse.ArgumentParser, out_required: bool = False) -> None:
    """What every command that reads params takes: -p/--params, --preset, -o/--out, overrides."""
    parser.add_argument("--params", "-p", action="append", default=None, metavar="PATH",
                        help="params file or directory (repeatable, later wins; default: params/)")
    parser.add_argument("--preset", default=None,
                        help="overlay params/presets/<PRESET>.yaml (e.g. cifar10, imagenet_vit_b16)")
    parser.add_argument("--out", "-o", required=out_required, default=None, metavar="DIR",
                        help="output folder")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override params, e.g. model.num_parts=4 pretrain.epochs=2")


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.params or ["params"], args.overrides, args.preset)


def save_config(config: Config, path: Path) -> None:
    from emae.io import atomic_write_text

    atomic_write_text(path, dump_yaml(config.to_dict()))
