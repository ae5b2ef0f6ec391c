"""One dataclass tree for a run (model/teacher/data/optim/loss/ckpt/dist/runtime) <-> YAML.

Recipes are YAML files in ``fdfast/recipes``; ``--set a.b=value`` overrides a key. Unknown keys are errors
that name the key and the nearest valid one.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fdfast.errors import FDFastError

RECIPE_DIR = Path(__file__).parent / "recipes"


@dataclass
class ModelConfig:
    """The student."""
    arch: str = "vit"  # vit (BEiT-style, shared relative position bias) | swinv2
    size: str = "tiny"  # tiny | small | base | large (vit); tiny | small | base | large | fd | giant (swinv2)
    patch_size: int = 16
    img_size: int = 224
    drop_path: float = 0.1  # max of the linear ramp over depth
    pos_bias: str = "shared"  # shared | per_block | abs (the paper's ablation; shared is FD's)
    attention: str = "auto"  # rpb attention backend: auto | triton | reference
    kwargs: dict = field(default_factory=dict)  # extra timm model kwargs


@dataclass
class TeacherConfig:
    name: str = "vit_small_patch14_dinov2"  # a registry name or any timm model name
    weights: str | None = None  # local file; None: the registry's default source
    img_size: int | None = None  # None: the student's img_size
    align: str = "bilinear"  # how a teacher grid is resized to the student grid: bilinear | area
    kwargs: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    path: str | None = None  # image folder (class subfolders or flat) or file list; None: the demo images
    loader: str = "auto"  # auto | dali | torch | synthetic
    batch_size: int = 32  # per device, per micro-step
    num_workers: int = 2
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    hflip: float = 0.5
    seed: int = 0
    check: str = "fast"  # file check before reading, cached: fast (header + end marker) | full (decode) | off
    cache_dir: str | None = None  # where file-check results are cached; None: $FDFAST_CACHE/filecheck


@dataclass
class OptimConfig:
    steps: int = 400  # optimizer steps in the whole run
    warmup_steps: int = 40
    base_lr: float = 3e-4  # scaled by global_batch / lr_batch_ref
    lr_batch_ref: int = 512
    min_lr: float = 5e-6
    warmup_lr: float = 5e-7
    weight_decay: float = 0.05  # none on 1-D params, biases, tokens, position tables
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float | None = 3.0
    accum_steps: int = 1
    fused: str = "auto"  # fused AdamW: auto (on CUDA) | true | false


@dataclass
class LossConfig:
    beta: float = 2.0
    eps: float = 1e-5
    whiten: bool = True
    backend: str = "auto"  # auto | triton | torch | reference


@dataclass
class CkptConfig:
    every: int = 100  # steps between checkpoints (0: only the final one)
    keep: int = 2  # committed checkpoints kept on disk (the newest)


@dataclass
class DistConfig:
    strategy: str = "auto"  # auto | none | ddp | fsdp
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each block


@dataclass
class RuntimeConfig:
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    seed: int = 0
    log_every: int = 10
    progress: bool = True
    tensorboard: bool = True


@dataclass
class Config:
    recipe: str = "demo"
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        return _build(cls, d, prefix="")


def _to_plain(x):
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


def _nearest(key: str, options) -> str:
    match = difflib.get_close_matches(key, list(options), n=1, cutoff=0.0)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _coerce(value, tp, name: str):
    """Convert a YAML / --set value to the annotated field type, or raise FDFastError naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # Optional[X] and X | None
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if tp is typing.Any:
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise FDFastError(f"config key {name!r} needs {len(args)} values like [a, b], got {value!r}")
        return tuple(_coerce(v, a, name) for v, a in zip(value, args))
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise FDFastError(f"config key {name!r} needs a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise FDFastError(f"config key {name!r} needs true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise FDFastError(f"config key {name!r} needs a number, got {value!r}")
        try:
            out = tp(value)
        except (TypeError, ValueError):
            what = "a whole number" if tp is int else "a number"
            raise FDFastError(f"config key {name!r} needs {what}, got {value!r}") from None
        if tp is int and float(value) != out:
            raise FDFastError(f"config key {name!r} needs a whole number, got {value!r}")
        return out
    if tp is str:
        if value is None or isinstance(value, (dict, list)):
            raise FDFastError(f"config key {name!r} needs a string, got {value!r}")
        return str(value)
    return value


def _build(cls, d: dict, prefix: str):
    if not isinstance(d, dict):
        raise FDFastError(f"config section {prefix.rstrip('.') or 'root'!r} must be a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        if key not in names:
            raise FDFastError(f"unknown config key {prefix + key!r}{_nearest(key, names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, prefix + key + ".")
        else:
            kwargs[key] = _coerce(value, tp, prefix + key)
    return cls(**kwargs)


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str) -> dict:
    """A recipe by name (fdfast/recipes/NAME.yaml) or by path, as a plain dict."""
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPE_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise FDFastError(f"unknown recipe {name_or_path!r}{_nearest(name_or_path, recipe_names())}; "
                              f"choose one of {recipe_names()} or pass a YAML file")
    elif not path.exists():
        raise FDFastError(f"recipe file {str(path)!r} does not exist")
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise FDFastError(f"recipe {str(path)!r} is not valid YAML: {e}") from None
    d.setdefault("recipe", path.stem)
    return d


def parse_override(item: str) -> tuple[str, Any]:
    """'a.b=value' -> ('a.b', YAML-parsed value)."""
    if "=" not in item:
        raise FDFastError(f"--set expects key=value (e.g. optim.base_lr=1e-4), got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def apply_overrides(d: dict, overrides: dict[str, Any]) -> dict:
    """Set dotted keys in a nested dict (validation happens in Config.from_dict)."""
    for key, value in overrides.items():
        node = d
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise FDFastError(f"config key {key!r}: {p!r} is not a section")
        node[parts[-1]] = value
    return d


def load_config(recipe: str = "demo", overrides: dict[str, Any] | None = None) -> Config:
    """Recipe + overrides -> validated Config."""
    d = apply_overrides(load_recipe(recipe), overrides or {})
    return Config.from_dict(d)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(cfg.to_yaml())
