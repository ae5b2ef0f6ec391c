"""One dataclass tree for a run (model/teacher/data/optim/loss/ckpt/dist/runtime) <-> YAML.

Recipes are YAML files in ``fdfast/recipes``; ``--set a.b=value`` overrides a key. This module is the one place
a config is checked: unknown keys, wrong types, choices (``Literal[...]`` fields) and ranges are errors that name
the key, the allowed values and the nearest valid one, raised while the config is built.
"""
from __future__ import annotations

import dataclasses
import difflib
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fdfast.errors import FDFastError
from fdfast.kernels.choices import ATTENTION_BACKENDS, FUSED_LOSS_KINDS, LOSS_BACKENDS, LOSS_KINDS  # noqa: F401

# Choices defined once: config fields use these, and the modules that act on them read the same values
# (typing.get_args), so a new choice is one edit.
Loader = Literal["auto", "dali", "torch", "synthetic"]  # fdfast.data.resolve_loader
PosBias = Literal["shared", "per_block", "abs"]  # fdfast.models.student
Precision = Literal["auto", "fp32", "bf16", "fp16"]  # fdfast.runtime.PRECISIONS (+ auto)
Malloc = Literal["auto", "default"]  # fdfast.hostmem
Tracker = Literal["tensorboard", "wandb", "none"]  # fdfast.metrics.MetricsLog (wandb: fdfast.trackers)

RECIPE_DIR = Path(__file__).parent / "recipes"
FINETUNE_PREFIX = "ft_"  # recipes/ft_*.yaml are fine-tuning recipes (fdfast finetune); the others are FD recipes


@dataclass
class ModelConfig:
    """The student."""
    arch: Literal["vit", "swinv2"] = "vit"  # vit: BEiT-style, shared relative position bias
    size: str = "tiny"  # tiny | small | base | large (vit); tiny | small | base | large | fd | giant (swinv2)
    patch_size: int = 16
    img_size: int = 224
    drop_path: float = 0.1  # max of the linear ramp over depth
    pos_bias: PosBias = "shared"  # the paper's ablation; shared is FD's
    attention: Literal[ATTENTION_BACKENDS] = "auto"  # rpb attention backend
    kwargs: dict = field(default_factory=dict)  # extra timm model kwargs


@dataclass
class TeacherConfig:
    name: str = "vit_small_patch14_dinov2"  # a registry name or any timm model name
    weights: str | None = None  # local file; None: the registry's default source
    img_size: int | None = None  # None: the student's img_size
    align: Literal["bilinear", "area"] = "bilinear"  # how a teacher grid is resized to the student grid
    drop_path: float = 0.0  # the paper's is 0 (asymmetric: only the student drops paths); > 0: the ablation
    kwargs: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    path: str | None = None  # image folder (class subfolders or flat) or file list; None: the demo images
    loader: Loader = "auto"
    batch_size: int = 32  # per device, per micro-step
    num_workers: int = 2
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    hflip: float = 0.5
    seed: int = 0
    check: Literal["fast", "full", "off"] = "fast"  # cached file check: fast = header + end marker, full = decode
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
    fused: Literal["auto", "true", "false"] = "auto"  # fused AdamW; auto: on CUDA and the CPU


@dataclass
class LossConfig:
    beta: float = 2.0  # smooth-L1's beta (kind smooth_l1 only)
    eps: float = 1e-5
    whiten: bool = True  # the paper's LayerNorm without affine on the target
    backend: Literal[LOSS_BACKENDS] = "auto"
    # what is distilled: tokens = the full feature map (the paper's); cls = the CLS token (mean-pooled token for
    # models without one); embedding = the teacher's final pooled output (CLIP projection / classifier logits)
    target: Literal["tokens", "cls", "embedding"] = "tokens"
    kind: Literal[LOSS_KINDS] = "smooth_l1"  # fused Triton kernel: smooth_l1, l2 (FUSED_LOSS_KINDS)




@dataclass
class CkptConfig:
    every: int = 100  # steps between checkpoints (0: only the final one)
    keep: int = 2  # committed checkpoints kept on disk (the newest)
    # full: one process writes the gathered state (safetensors + torch.save); dcp: torch.distributed.checkpoint,
    # every rank its own shards, resumable on another world size; auto: dcp when FSDP2 shards, else full
    format: Literal["auto", "full", "dcp"] = "auto"
    async_save: bool = True  # dcp: write in a background thread, committed at the next save / the end


@dataclass
class DistConfig:
    strategy: Literal["auto", "none", "ddp", "fsdp"] = "auto"  # auto: DDP under torchrun
    activation_checkpointing: bool = False
    # torch.compile the student's blocks and the teacher; auto: when the run is long enough to repay the compile
    compile: Literal["auto", "true", "false"] = "auto"


@dataclass
class RuntimeConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Precision = "auto"  # auto: bf16 on CUDA / CPUs with native bf16
    malloc: Malloc = "auto"  # auto: glibc keeps freed memory on CPU runs (fdfast.hostmem)
    seed: int = 0
    log_every: int = 10
    progress: bool = True
    # where the metrics rows go besides metrics.jsonl: TensorBoard (DIR/tb), Weights & Biases (the wandb extra;
    # offline into DIR/wandb without an API key), or nowhere else
    tracker: Tracker = "tensorboard"


# Keys renamed since they shipped, still read in old recipes, saved config.yaml files and --set: old dotted key ->
# (new dotted key in the same section, the old value's type, old value -> new value). Given beside the new key in
# one mapping, the two must agree; a --set of either name replaces the other in the file it overrides.
RENAMED_KEYS = {"runtime.tensorboard": ("runtime.tracker", bool, {True: "tensorboard", False: "none"}.get)}


class ConfigTree:
    """YAML / plain-dict round trip of a dataclass tree; a subclass says how it is checked (``checked``)."""

    def to_dict(self) -> dict:
        return _to_plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict):
        """A checked tree from plain data (a recipe, a saved config.yaml, --set overrides)."""
        return _build(cls, d, prefix="").checked()

    def checked(self):
        raise NotImplementedError


@dataclass
class Config(ConfigTree):
    recipe: str = "demo"
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def checked(self) -> "Config":
        return validate(self)


def validate(cfg: Config) -> Config:
    """Choices and ranges, checked in place; from_dict calls it, train() again for a config built in code."""
    check_choices(cfg)
    o = cfg.optim
    if o.steps < 1:
        raise FDFastError(f"the step count must be >= 1, got {o.steps} (--steps N)")
    for key, value, low in (("optim.warmup_steps", o.warmup_steps, 0), ("data.batch_size", cfg.data.batch_size, 1),
                            ("optim.accum_steps", o.accum_steps, 1), ("runtime.log_every", cfg.runtime.log_every, 1),
                            ("ckpt.every", cfg.ckpt.every, 0), ("ckpt.keep", cfg.ckpt.keep, 1)):
        if value < low:
            raise FDFastError(f"{key} must be >= {low}, got {value}")
    if o.base_lr <= 0:
        raise FDFastError(f"optim.base_lr must be > 0, got {o.base_lr}")
    if not 0 <= cfg.teacher.drop_path < 1:
        raise FDFastError(f"teacher.drop_path must be in [0, 1), got {cfg.teacher.drop_path}")
    if cfg.loss.backend == "triton" and cfg.loss.kind not in FUSED_LOSS_KINDS:
        raise FDFastError(f"loss.backend=triton has no fused kernel for loss.kind={cfg.loss.kind} (it covers "
                          f"{', '.join(FUSED_LOSS_KINDS)}); use loss.backend=auto or torch")
    if o.warmup_steps >= o.steps:  # e.g. --steps 20 on a recipe with 30 warmup steps
        warmup = o.steps // 10
        print(f"fdfast: optim.warmup_steps={o.warmup_steps} >= steps={o.steps}; warming up over {warmup} "
              f"steps (10% of the run) instead", file=sys.stderr)
        o.warmup_steps = warmup
    return cfg


def check_choices(tree, prefix: str = "") -> None:
    """Every Literal field of a dataclass tree holds one of its values (a config built in code, too)."""
    hints = typing.get_type_hints(type(tree))
    for f in dataclasses.fields(tree):
        value, tp = getattr(tree, f.name), hints[f.name]
        if dataclasses.is_dataclass(tp):
            check_choices(value, prefix + f.name + ".")
        elif typing.get_origin(tp) is Literal:
            setattr(tree, f.name, _choice(value, typing.get_args(tp), prefix + f.name))


def _to_plain(x):
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


def _nearest(key: str, options) -> str:
    match = difflib.get_close_matches(key, list(options), n=1, cutoff=0.0)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _choice(value, allowed: tuple, name: str):
    """A Literal field's value, or one line with the allowed values and the nearest one."""
    if isinstance(value, bool):  # YAML reads `true` as a bool; the choice is the string "true"
        value = str(value).lower()
    if value in allowed:
        return value
    raise FDFastError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}"
                      f"{_nearest(str(value), [str(a) for a in allowed])}")


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
    if origin is Literal:
        return _choice(value, args, name)
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


def _renamed(key: str, value) -> tuple[str, Any]:
    """(new dotted key, new value) of a key in RENAMED_KEYS; any other key as it is."""
    if key not in RENAMED_KEYS:
        return key, value
    new_key, tp, convert = RENAMED_KEYS[key]
    return new_key, convert(_coerce(value, tp, key))


def _read_renamed(d: dict, prefix: str) -> dict:
    """A section's mapping with its old key names (RENAMED_KEYS) read as the new ones."""
    out = dict(d)
    for key, value in d.items():
        old_key = f"{prefix}{key}"
        new_key, new_value = _renamed(old_key, value)
        if new_key == old_key:
            continue
        name = new_key.rsplit(".", 1)[-1]
        if name in d and d[name] != new_value:
            raise FDFastError(f"config keys {old_key}={value!r} (the old name for {new_key}={new_value}) and "
                              f"{new_key}={d[name]!r} disagree; keep only {new_key}")
        del out[key]
        out[name] = new_value
    return out


def _build(cls, d: dict, prefix: str):
    if not isinstance(d, dict):
        raise FDFastError(f"config section {prefix.rstrip('.') or 'root'!r} must be a mapping, got {d!r}")
    d = _read_renamed(d, prefix)
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


def recipe_names(finetune: bool | None = False) -> list[str]:
    """FD recipe names (`fdfast train`); finetune=True: the fine-tuning ones; None: every recipe."""
    stems = (p.stem for p in RECIPE_DIR.glob("*.yaml"))
    return sorted(s for s in stems if finetune is None or s.startswith(FINETUNE_PREFIX) == finetune)


def load_recipe(name_or_path: str) -> dict:
    """A recipe by name (fdfast/recipes/NAME.yaml) or by path, as a plain dict."""
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPE_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            names = recipe_names(finetune=None)
            raise FDFastError(f"unknown recipe {name_or_path!r}{_nearest(name_or_path, names)}; "
                              f"choose one of {names} or pass a YAML file")
    elif not path.exists():
        raise FDFastError(f"recipe file {str(path)!r} does not exist")
    d = read_yaml(path, "recipe")
    d.setdefault("recipe", path.stem)
    return d


def read_yaml(path: Path, what: str = "config file") -> dict:
    """A YAML file holding a mapping (a recipe, a run's config.yaml), or one FDFastError naming the file and the
    line and column of a syntax error (PyYAML's own message spans several lines)."""
    try:
        d = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or " ".join(str(e).split())
        raise FDFastError(f"{what} {str(path)!r} is not valid YAML{where}: {problem}; fix the file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FDFastError(f"cannot read {what} {str(path)!r}: {e}") from None
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise FDFastError(f"{what} {str(path)!r} must be a YAML mapping of sections (model:, data:, optim:, ...), "
                          f"got a {type(d).__name__}")
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
        key, value = _renamed(key, value)
        node = d
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise FDFastError(f"config key {key!r}: {p!r} is not a section")
        node[parts[-1]] = value
        for old in (o for o, (new, *_) in RENAMED_KEYS.items() if new == key):  # the override replaces it
            node.pop(old.rsplit(".", 1)[-1], None)
    return d


def load_config(recipe: str = "demo", overrides: dict[str, Any] | None = None) -> Config:
    """FD recipe + overrides -> validated Config."""
    if Path(recipe).stem.startswith(FINETUNE_PREFIX):
        raise FDFastError(f"recipe {recipe!r} is a fine-tuning recipe: run it with `fdfast finetune MODEL {recipe}`, "
                          f"or train with an FD recipe, one of {recipe_names()}")
    d = apply_overrides(load_recipe(recipe), overrides or {})
    return Config.from_dict(d)


def config_from_cli(args, flag_keys: dict, tree: type, load, default_out: str):
    """(checked config, run dir) of a command line: recipe + flags + --set; a resumed run continues with its
    saved config.yaml (+ the explicit overrides). ``flag_keys`` maps argparse dests to config keys."""
    overrides = dict(parse_override(s) for s in args.set)
    overrides.update({key: getattr(args, flag) for flag, key in flag_keys.items() if getattr(args, flag) is not None})
    out = Path(args.out or default_out)
    saved = out / "config.yaml"
    if args.resume and saved.is_file():
        return tree.from_dict(apply_overrides(read_yaml(saved, "the run's saved config"), overrides)), out
    return load(args.recipe, overrides), out


def add_run_arguments(p) -> None:
    """The flags every run command shares (--device, --resume, --set), added to an argparse parser."""
    p.add_argument("--device", choices=("auto", "cpu", "cuda"))
    p.add_argument("--resume", help="'auto' (newest committed checkpoint in --out) or a checkpoint path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
