"""Typed stage configs: dataclasses filled from `configs/*.yaml` plus `key.sub=value` overrides.

Defaults live in the dataclasses (one place); a YAML file only says what differs. An unknown key,
a wrong type or a bad value is an error that names the key and the file, before any work starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml

from fourdthinker.errors import UsageError

T = TypeVar("T")


class ConfigError(UsageError):
    pass


def _convert(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    optional = origin in (typing.Union, types.UnionType) and type(None) in args
    if value is None and not optional and hint is not Any:
        raise ConfigError(f"{where}: a value is required")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_convert(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "false", "1", "0", "yes", "no"}:
            return value.lower() in {"true", "1", "yes"}
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if hint is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if hint is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if typing.get_origin(hint) is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: must be one of {list(args)}, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(fields)}")
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{where}: {err}") from None
    check = getattr(obj, "validate", None)
    if check is not None:
        check()
    return obj


def _set_path(data: dict[str, Any], dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
    try:
        node[keys[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError:
        node[keys[-1]] = raw  # not YAML (e.g. "...", "@x", "[1,"): the plain string the user typed


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """`cls` from a YAML file (optional) with `a.b=value` overrides applied on top."""
    data: dict[str, Any] = {}
    where = "config"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file")
        where = str(path)
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = loaded
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, raw = item.split("=", 1)
        _set_path(data, key.strip(), raw)
    return from_dict(cls, data, where)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


# Resources Ray counts under their own options (num_cpus, num_gpus, memory): a mapping of named
# resources must not repeat them, or Ray rejects the request at schedule time, long after load.
RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def check_named_resources(key: str, resources: dict[str, Any]) -> None:
    """A `{name: amount}` mapping of Ray custom resources (a node's `--resources`, e.g. a cluster
    worker type's `accelerator_type:H200` or a role name) asked for per actor or worker."""
    for name, amount in resources.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{key}: resource names must be non-empty strings, got {name!r}")
        if name in RAY_BUILTIN_RESOURCES:
            raise ConfigError(f"{key}.{name}: CPUs, GPUs and memory have their own keys; list only named "
                              "(custom) resources here")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
            raise ConfigError(f"{key}.{name}: expected an amount >= 0, got {amount!r}")

def _field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in the class source: the `# ...` after it on its line, else the comment
    lines just above it (the two styles the configs use)."""
    import inspect
    import re

    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    comments, above = {}, []
    for line in lines[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("#").strip())
            continue
        match = re.match(r"\s+(\w+)\s*:[^=]*(?:=.*?)?(?:\s#\s*(.*))?$", line)
        if match and not stripped.startswith(("def ", "@", "return")):
            comments.setdefault(match.group(1), match.group(2) or " ".join(above))
        above = []
    return comments


def config_help(cls: type, prefix: str = "") -> str:
    """Every key of the config dataclass `cls` with its default and description, one per line;
    a nested section's keys as `section.key` (for `--help`)."""
    comments = _field_comments(cls)
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            doc = (hints[f.name].__doc__ or "").strip().splitlines()
            lines.append(f"  {name}:  section{' - ' + doc[0] if doc else ''}")
            lines.append(config_help(hints[f.name], prefix=f"{name}."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "(required)"
        comment = comments.get(f.name, "")
        lines.append(f"  {name}={default!r}" + (f"  {comment}" if comment else ""))
    return "\n".join(lines)


def check_model_dir(path: str, key: str = "model_dir") -> None:
    """A local Hugging Face model directory (it holds config.json), checked before Ray starts."""
    if not Path(path, "config.json").is_file():
        what = "does not exist" if not Path(path).exists() else "holds no config.json"
        raise ConfigError(f"{key}={path}: {what}; give a local model directory (e.g. one written by "
                          "`fourdthinker tiny-model --out DIR`, or a downloaded Qwen2.5-VL)")


def check_file(path: str, key: str, what: str) -> None:
    if not Path(path).is_file():
        raise ConfigError(f"{key}={path}: no such file; give the path of {what}")


# -- stage configs ---------------------------------------------------------------------------------
@dataclasses.dataclass
class DiftConfig:
    """DIFT (Dynamic-Imagery Fine-Tuning). Defaults are the reference's (REFERENCE.md "DIFT defaults")."""

    # Made absolute before Ray starts; refused when relative under a Ray job (fourdthinker.paths).
    PATH_KEYS: ClassVar[tuple[str, ...]] = ("model_dir", "train_jsonl", "output_dir")

    model_dir: str = ""  # a local Qwen2.5-VL (with or without latent tokens; they are added if missing)
    train_jsonl: str = ""  # DIFT JSONL in the reference format
    output_dir: str = "runs/dift"  # Ray Train storage; the final HF checkpoint goes to <output_dir>/final
    run_name: str = "dift"
    latent_size: int = 4  # used only when the base model has no latent tokens yet
    ce_weight: float = 0.1
    sim_weight: float = 1.0
    lr: float = 1e-5
    weight_decay: float = 0.01
    warmup_steps: int = 10
    min_lr_ratio: float = 0.0
    epochs: int = 1
    max_steps: int = -1  # -1: epochs x steps per epoch
    per_device_batch_size: int = 1
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    zero_stage: int = 2
    gradient_checkpointing: bool = True
    compile: bool = False  # torch.compile each transformer block (fourdthinker.model.compile_blocks)
    bf16: bool | None = None  # None: bf16 on GPU, fp32 on CPU
    num_workers: int = 1
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    cpus_per_worker: float = 1.0
    # Named Ray resources each worker also asks for, e.g. {"accelerator_type:H200": 0.001} to land on
    # one cluster worker type (cluster.yaml declares the names its node types offer).
    worker_resources: dict[str, float] = dataclasses.field(default_factory=dict)
    checkpoint_every: int = 50  # optimizer steps; 0 disables intermediate checkpoints
    keep_checkpoints: int = 2
    seed: int = 42
    max_frames: int = 50
    max_pixels: int = 256 * 28 * 28
    tensorboard: bool = True
    progress_bar: bool = True

    def validate(self) -> None:
        if not self.model_dir:
            raise ConfigError("model_dir: required (a local model directory)")
        if not self.train_jsonl:
            raise ConfigError("train_jsonl: required (a DIFT JSONL file)")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.compile and self.zero_stage == 3:
            # ZeRO-3 gathers each sub-module's parameters in hooks inside the blocks compile fuses
            raise ConfigError("compile: true needs zero_stage 0-2 (ZeRO-3's per-module parameter "
                              "gathering runs inside the compiled blocks); set compile: false")
        for name in ("per_device_batch_size", "grad_accum", "num_workers", "epochs", "latent_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr: must be positive, got {self.lr}")
        check_named_resources("worker_resources", self.worker_resources)

    def check_inputs(self) -> None:
        """The input files exist and the JSONL has a usable sample (on the driver, before Ray starts)."""
        check_model_dir(self.model_dir)
        check_file(self.train_jsonl, "train_jsonl", "a DIFT JSONL file (pipelines/preprocess.py writes dift.jsonl)")
        from fourdthinker.data.dift_dataset import read_dift_jsonl, require_usable

        samples, skipped = read_dift_jsonl(self.train_jsonl)
        require_usable(self.train_jsonl, len(samples), skipped)
