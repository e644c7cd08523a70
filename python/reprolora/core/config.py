"""The job's configuration: one TOML file and any `--set KEY=VALUE` overrides, every field typed and validated.

The defaults below are the default job (seed 42, LoRA r=16, alpha=32, dropout 0.1, one epoch), and this is the
only place they are written. A TOML file only names what it changes; relative paths in it are relative to the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Any, get_args, get_origin, get_type_hints

from reprolora.core.errors import ReproloraError
from reprolora.core.pins import PROFILES
from reprolora.models.families import PRESETS

SCHEDULES = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class BaseModelConfig:
    path: str = ""  # a local Hugging Face folder (safetensors); "" = the built-in default model
    name: str = ""  # stable identifier written into adapter_config.json; "" = derived from the model's hashes


@dataclass(frozen=True)
class DatasetConfig:
    path: str = ""  # a JSONL file; "" = the built-in default dataset
    eval_fraction: float = 0.15  # share of examples held out for eval loss, chosen by a seeded shuffle
    max_seq_len: int = 256  # longer examples are cut (the response keeps its tokens up to this length)


@dataclass(frozen=True)
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.1
    # module names, or a preset of reprolora.models.families ("attention", "all-linear") that training expands per
    # family
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    max_steps: int = 0  # optimizer steps; 0 = as many as the epochs give
    batch_size: int = 4
    grad_accum: int = 1  # a step takes batch_size * grad_accum examples
    micro_batch_size: int = 1  # examples per forward/backward pass: the unit of work a process is given
    learning_rate: float = 1e-3
    lr_schedule: str = "cosine"  # one of SCHEDULES, after a linear warmup
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_batch_size: int = 8


@dataclass(frozen=True)
class ProbesConfig:
    """Prompts decoded greedily after training; their tokens and logits hash go into the manifest."""

    prompts: list[str] = field(
        default_factory=lambda: [
            "Why pin a toolchain?",
            "How do I prove a model came from these inputs?",
            "What changes floating-point results on a CPU?",
        ]
    )
    max_new_tokens: int = 48


@dataclass(frozen=True)
class Config:
    seed: int = 42
    profile: str = "native"  # "native", "portable", "portable-fast" or "reference", see reprolora.core.pins
    threads: int = 2
    base_model: BaseModelConfig = field(default_factory=BaseModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    probes: ProbesConfig = field(default_factory=ProbesConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _all_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in get_type_hints(cls).items():
        keys.append(prefix + name)
        if dataclasses.is_dataclass(tp):
            keys.extend(_all_keys(tp, prefix + name + "."))
    return keys


def _type_name(tp: Any) -> str:
    if get_origin(tp) is list:
        return {str: "a list of strings", int: "a list of integers"}.get(get_args(tp)[0], "a list")
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _check_type(value: Any, tp: Any, where: str) -> Any:
    if get_origin(tp) is UnionType:  # such as list[str] | str: the option of the value's own kind decides
        for option in get_args(tp):
            if isinstance(value, get_origin(option) or option):
                return _check_type(value, option, where)
        wanted = " or ".join(_type_name(option) for option in get_args(tp))
        raise ReproloraError(f"{where} must be {wanted}, got {type(value).__name__} {value!r}")
    if get_origin(tp) is list:
        if not isinstance(value, list):
            raise ReproloraError(f"{where} must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return [_check_type(item, get_args(tp)[0], f"{where}[{i}]") for i, item in enumerate(value)]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if (tp is int and isinstance(value, bool)) or not isinstance(value, tp):
        raise ReproloraError(f"{where} must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is float and not math.isfinite(value):
        raise ReproloraError(f"{where} must be a finite number, got {value!r}")
    return value


def _build(cls: type, table: dict[str, Any], source: str, prefix: str) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        dotted = prefix + key
        if key not in names:
            near = difflib.get_close_matches(dotted, _all_keys(Config), n=1, cutoff=0.5)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise ReproloraError(f"{source}: unknown key '{dotted}'{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ReproloraError(f"{source}: '{dotted}' must be a table [{dotted}], got {value!r}")
            values[key] = _build(tp, value, source, dotted + ".")
        else:
            values[key] = _check_type(value, tp, f"{source}: '{dotted}'")
    return cls(**values)


def _require(condition: bool, source: str, message: str) -> None:
    if not condition:
        raise ReproloraError(f"{source}: {message}")


def validate(config: Config, source: str) -> Config:
    t, lora, data = config.train, config.lora, config.dataset
    _require(
        config.profile in PROFILES, source, f"'profile' must be one of {', '.join(PROFILES)}, got {config.profile!r}"
    )
    _require(1 <= config.threads <= 256, source, f"'threads' must be between 1 and 256, got {config.threads}")
    _require(config.seed >= 0, source, f"'seed' must be >= 0, got {config.seed}")
    _require(
        0 < data.eval_fraction < 1, source, f"'dataset.eval_fraction' must be between 0 and 1, got {data.eval_fraction}"
    )
    _require(data.max_seq_len >= 8, source, f"'dataset.max_seq_len' must be at least 8, got {data.max_seq_len}")
    _require(lora.r >= 1, source, f"'lora.r' must be at least 1, got {lora.r}")
    _require(lora.alpha >= 1, source, f"'lora.alpha' must be at least 1, got {lora.alpha}")
    _require(0 <= lora.dropout < 1, source, f"'lora.dropout' must be in [0, 1), got {lora.dropout}")
    if isinstance(lora.target_modules, str):
        _require(
            lora.target_modules in PRESETS,
            source,
            f"'lora.target_modules' must be a list of module names or one of the presets {', '.join(PRESETS)}, "
            f"got {lora.target_modules!r}",
        )
    else:
        _require(len(lora.target_modules) > 0, source, "'lora.target_modules' must name at least one module")
        _require(all(lora.target_modules), source, "'lora.target_modules' must not hold an empty name")
    _require(t.epochs >= 1, source, f"'train.epochs' must be at least 1, got {t.epochs}")
    _require(t.max_steps >= 0, source, f"'train.max_steps' must be >= 0, got {t.max_steps}")
    _require(t.batch_size >= 1, source, f"'train.batch_size' must be at least 1, got {t.batch_size}")
    _require(t.grad_accum >= 1, source, f"'train.grad_accum' must be at least 1, got {t.grad_accum}")
    _require(t.micro_batch_size >= 1, source, f"'train.micro_batch_size' must be at least 1, got {t.micro_batch_size}")
    _require(t.eval_batch_size >= 1, source, f"'train.eval_batch_size' must be at least 1, got {t.eval_batch_size}")
    _require(t.learning_rate > 0, source, f"'train.learning_rate' must be > 0, got {t.learning_rate}")
    _require(
        t.lr_schedule in SCHEDULES,
        source,
        f"'train.lr_schedule' must be one of {', '.join(SCHEDULES)}, got {t.lr_schedule!r}",
    )
    _require(0 <= t.warmup_ratio < 1, source, f"'train.warmup_ratio' must be in [0, 1), got {t.warmup_ratio}")
    _require(t.weight_decay >= 0, source, f"'train.weight_decay' must be >= 0, got {t.weight_decay}")
    _require(t.max_grad_norm > 0, source, f"'train.max_grad_norm' must be > 0, got {t.max_grad_norm}")
    _require(config.probes.max_new_tokens >= 1, source, "'probes.max_new_tokens' must be at least 1")
    return config


def resolve_path(value: str, base_dir: Path) -> str:
    """A path from a config file, relative to that file's folder."""
    if not value:
        return value
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else base_dir / path)


def parse(text: str, source: str, base_dir: Path) -> Config:
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ReproloraError(f"{source}: not valid TOML: {e}") from None
    config = validate(_build(Config, table, source, ""), source)
    return dataclasses.replace(
        config,
        base_model=dataclasses.replace(config.base_model, path=resolve_path(config.base_model.path, base_dir)),
        dataset=dataclasses.replace(config.dataset, path=resolve_path(config.dataset.path, base_dir)),
    )


def with_overrides(config: Config, overrides: list[str]) -> Config:
    """`config` with each KEY=VALUE of `overrides` (the CLI's `--set`) applied in order and checked as a file's keys
    are. VALUE is read as a TOML value (`2`, `0.01`, `true`, `["q_proj"]`), else taken as the string it is."""
    if not overrides:
        return config
    table = config.to_dict()
    for item in overrides:
        key, equals, text = item.partition("=")
        if not equals or not key:
            raise ReproloraError(f"--set {item!r}: expected KEY=VALUE, such as train.epochs=2")
        try:
            value = tomllib.loads(f"value = {text}")["value"]
        except tomllib.TOMLDecodeError:
            value = text
        *tables, name = key.split(".")
        target = table
        for part in tables:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ReproloraError(f"--set {item!r}: '{part}' is a value, not a table")
        target[name] = value
    return validate(_build(Config, table, "--set", ""), "--set")


def load(path: str | Path | None) -> Config:
    """The default job's config (the defaults above), or the one in `path` (defaults for what it leaves out)."""
    if path is None:
        return validate(Config(), "<built-in defaults>")
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReproloraError(f"{path}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ReproloraError(f"{path}: can't read config file: {e}") from None
    return parse(text, str(path), path.parent)
