"""MODEL argument -> a timm classifier to fine-tune: backbone weights loaded strictly, a new head, the input norm.

MODEL is an FD run dir, a ``checkpoints/step-N`` dir, a student .safetensors (or an official FD .pth), an
``fdfast export --to timm`` file (or a fine-tuned ``best.safetensors``), ``teacher:NAME[@WEIGHTS]``, a timm model
folder (``local-dir:DIR``, e.g. ``fdfast export --to timm-dir``, or ``hf-hub:ORG/NAME`` from the Hugging Face
cache), or a timm model name (random init: the baseline). The classifier is METHOD.md's: mean-pooled patch tokens ->
fc_norm -> head (trunc-normal x ``head_init_scale``, bias 0); an FD student's shared relative position bias table is
copied into every block's own table (``fdfast export`` does the same). The fc_norm is new (LayerNorm weight 1,
bias 0) in the place of the final norm, whose weights go unused: what the published FD, BEiT and MAE fine-tuning
code and timm's ``train.py --gp avg`` do (issue 26 measured the alternative, starting it from the final norm).
"""
from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from fdfast.errors import FDFastError

MEAN_KEY, STD_KEY, CLASSES_KEY = "fdfast_mean", "fdfast_std", "fdfast_classes"  # extra safetensors metadata


@dataclass
class Backbone:
    """What a MODEL argument names: a timm architecture, its weights (None: random init), its input norm."""
    timm_name: str
    timm_kwargs: dict
    state_dict: dict | None
    mean: tuple
    std: tuple
    img_size: int | None  # the input size its weights were made for
    fixed_grid: bool  # position tables sized for img_size only (relative position bias tables, SwinV2)
    source: str


@dataclass
class Classifier:
    """A timm model with a new head, and how to recreate it (``timm.create_model(timm_name, **timm_kwargs)``)."""
    model: nn.Module
    timm_name: str
    timm_kwargs: dict
    mean: tuple
    std: tuple
    img_size: int
    source: str


def resolve_model(spec: str, img_size: int | None = None, kwargs: dict | None = None) -> Backbone:
    """MODEL argument -> Backbone; anything that is not a model is a one-line FDFastError."""
    if spec.startswith("teacher:"):
        return _teacher_backbone(spec, img_size)
    from fdfast.models.teachers import MODEL_FOLDERS
    if spec.startswith(MODEL_FOLDERS):  # a timm model folder: read as a teacher entry is (config.json + weights)
        return _teacher_backbone(spec, img_size, name=spec)
    path = Path(spec)
    if path.exists():
        if path.is_file() and path.suffix == ".safetensors" and _timm_meta(path):
            return _export_backbone(path)
        return _student_backbone(path)
    import timm
    if timm.is_model(spec.split(".")[0]):
        return _timm_name_backbone(spec, kwargs or {})
    raise FDFastError(f"MODEL {spec!r} is neither an existing run / checkpoint / exported file, teacher:NAME[@WEIGHTS] "
                      f"(see `fdfast teachers`), a timm model folder (local-dir:DIR, hf-hub:ORG/NAME), nor a timm "
                      f"model name")


def _teacher_backbone(spec: str, img_size: int | None, name: str | None = None) -> Backbone:
    from fdfast.diagnostics.inputs import timm_model
    from fdfast.models.teachers import build_teacher, get_entry
    weights = None
    if name is None:
        name, _, weights = spec[len("teacher:"):].partition("@")
    if not name:
        raise FDFastError("teacher:NAME needs a name, e.g. teacher:demo-dinov2-s14 (see `fdfast teachers`)")
    entry = get_entry(name)
    if img_size is not None:
        _check_patch(_patch_of(entry.timm_name, entry.timm_kwargs), img_size, spec)
    teacher = build_teacher(name, weights=weights or None, img_size=img_size)  # position embedding resampled
    backbone = timm_model(teacher)
    if not hasattr(backbone, "get_classifier"):
        raise FDFastError(f"MODEL {spec!r}: the teacher is a feature extractor without a classifier head "
                          f"({type(backbone).__name__}); fine-tune ViT / Swin teachers, or the timm model name")
    kwargs = dict(entry.timm_kwargs)
    if "img_size" in _init_params(type(backbone)):
        kwargs["img_size"] = teacher.img_size
    return Backbone(entry.timm_name, kwargs, backbone.state_dict(), tuple(teacher.mean), tuple(teacher.std),
                    teacher.img_size, False, spec)


def _student_backbone(path: Path) -> Backbone:
    """An FD student (run dir, step dir, student file, official .pth) as its plain timm model (per-block RPB)."""
    from fdfast.models.export import read_any_student, timm_export
    model_cfg, sd = read_any_student(path)
    timm_name, kwargs, sd = timm_export(model_cfg, sd)
    mean, std = run_norm(path)
    return Backbone(timm_name, kwargs, sd, mean, std, int(model_cfg.get("img_size", 224)), True, str(path))


def _export_backbone(path: Path) -> Backbone:
    from safetensors.torch import load_file
    meta = _timm_meta(path)
    try:
        kwargs = json.loads(meta.get("timm_kwargs", "{}"))
    except ValueError:
        raise FDFastError(f"{path}: its timm_kwargs metadata is not JSON; re-export it with `fdfast export`") from None
    mean, std = run_norm(path)
    if MEAN_KEY in meta:
        mean, std = tuple(json.loads(meta[MEAN_KEY])), tuple(json.loads(meta[STD_KEY]))
    size = kwargs.get("img_size")
    return Backbone(meta["timm_model"], kwargs, load_file(str(path)), mean, std,
                    int(size) if isinstance(size, int) else None, True, str(path))


def _timm_name_backbone(name: str, kwargs: dict) -> Backbone:
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(name)
    cfg = cfg.to_dict() if cfg is not None else {}
    mean, std = tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN)), tuple(cfg.get("std", IMAGENET_DEFAULT_STD))
    return Backbone(name.split(".")[0], dict(kwargs), None, mean, std, None, False, name)


def _timm_meta(path: Path) -> dict:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise FDFastError(f"{path} is not a readable safetensors file ({e}); pass a model checkpoint") from None
    return meta if "timm_model" in meta else {}


def run_norm(path: Path) -> tuple[tuple, tuple]:
    """(mean, std) an FD student was trained with: its run's teacher's; ImageNet's when no run config is found."""
    from fdfast.diagnostics.inputs import find_run_config
    teacher = (find_run_config(Path(path)) or {}).get("teacher")
    if isinstance(teacher, dict) and teacher.get("name"):
        from fdfast.models.teachers import get_entry
        entry = get_entry(teacher["name"])
        return tuple(entry.mean), tuple(entry.std)
    return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)


# ---- the classifier ---------------------------------------------------------------------------------------

def build_classifier(backbone: Backbone, num_classes: int, img_size: int | None = None, drop_path: float = 0.0,
                     head_init_scale: float = 0.001) -> Classifier:
    """timm model of ``backbone`` with a new ``num_classes`` head; weights loaded strictly (all but the head).

    num_classes=0: the frozen feature model of knn / linprobe (pooled features, no head, no fc_norm unless the
    weights carry one).
    """
    import timm
    size = img_size or backbone.img_size or _default_size(backbone)
    _check_patch(_patch_of(backbone.timm_name, backbone.timm_kwargs), size, backbone.source)
    if backbone.fixed_grid and backbone.img_size and size != backbone.img_size:
        raise FDFastError(f"MODEL {backbone.source!r} was trained at {backbone.img_size} px and its relative position "
                          f"tables fit only that patch grid; use an image size of {backbone.img_size} px")
    kwargs = dict(backbone.timm_kwargs, num_classes=num_classes, drop_path_rate=drop_path)
    cls = _timm_class(backbone.timm_name, kwargs)
    kwargs = _with_size(kwargs, size, cls)
    sd = backbone.state_dict
    fc_norm = num_classes > 0 or (sd is not None and "fc_norm.weight" in sd)
    kwargs.update(_pooled_head_kwargs(cls, fc_norm))
    model = timm.create_model(backbone.timm_name, pretrained=False, **kwargs)
    if sd is not None:
        sd, new = _new_fc_norm(model, sd)
        load_backbone_strict(model, sd, backbone.source, new)
    if num_classes > 0:
        init_head(model, head_init_scale)
    export_kwargs = {k: v for k, v in kwargs.items() if k != "drop_path_rate"}
    return Classifier(model, backbone.timm_name, export_kwargs, backbone.mean, backbone.std, size, backbone.source)


def _pooled_head_kwargs(cls, fc_norm: bool) -> dict:
    """METHOD.md's head for ViT families: mean of the patch tokens -> fc_norm -> head (Swin/CNN keep theirs).

    fc_norm=False: the final norm stays on every token and the mean of the normalised patch tokens is the feature.
    """
    params = _init_params(cls)
    if "use_fc_norm" in params:  # BEiT, EVA
        return {"global_pool": "avg", "use_fc_norm": fc_norm}
    if "fc_norm" in params:  # VisionTransformer (DINO, DeiT, CLIP, MAE)
        return {"global_pool": "avg", "fc_norm": fc_norm}
    return {}


def _new_fc_norm(model: nn.Module, sd: dict) -> tuple[dict, set[str]]:
    """(weights to load, keys that keep the model's own init): a pooled head's new fc_norm starts as LayerNorm(1, 0)
    and the weights' final norm is dropped, its module being an Identity in this model.

    Weights that carry an fc_norm (a fine-tuned classifier) load it; models whose final norm stays (Swin, CNNs,
    the pooled features of knn / linprobe) load theirs."""
    own = model.state_dict()
    fc_norm = {k for k in own if k.startswith("fc_norm.")}
    if not fc_norm or any(k.startswith("fc_norm.") for k in sd) or any(k.startswith("norm.") for k in own):
        return sd, set()
    return {k: v for k, v in sd.items() if not k.startswith("norm.")}, fc_norm


def head_parameter_names(model: nn.Module) -> set[str]:
    head = model.get_classifier()
    ids = {id(p) for p in head.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _old_head_keys(model: nn.Module, sd: dict) -> set[str]:
    """Keys of a previous classifier in ``sd`` (timm's pretrained_cfg names the classifier module)."""
    name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    names = [name] if isinstance(name, str) else list(name or [])
    return {k for k in sd if any(k.startswith(n + ".") for n in names)}


def load_backbone_strict(model: nn.Module, sd: dict, source: str, new: set[str] = frozenset()) -> None:
    """Every weight but the head and ``new`` (keys that keep the model's own init) comes from ``sd`` (an old head is
    dropped); a missing, extra or misshaped key is an error listing the keys, never a silent partial load."""
    head = head_parameter_names(model) | set(new)
    own = model.state_dict()
    drop = head | _old_head_keys(model, sd)
    sd = {k: v for k, v in sd.items() if k not in drop}
    missing = sorted(set(own) - set(sd) - head)
    extra = sorted(set(sd) - set(own))
    shape = sorted(k for k in set(sd) & set(own) if tuple(sd[k].shape) != tuple(own[k].shape))
    if missing or extra or shape:
        parts = [f"{what} {keys[:4]}{' ...' if len(keys) > 4 else ''}"
                 for what, keys in (("missing", missing), ("unexpected", extra), ("wrong shape", shape)) if keys]
        raise FDFastError(f"MODEL {source!r} does not fit its timm architecture ({'; '.join(parts)}); "
                          f"pass a checkpoint written by fdfast (train / export / finetune)")
    full = dict(sd)
    full.update({k: own[k] for k in head})
    model.load_state_dict(full, strict=True)


def init_head(model: nn.Module, scale: float) -> None:
    """trunc_normal(std 0.02, within 2 std) x scale, bias 0: the fine-tuning head starts almost silent (METHOD.md: x0.001)."""
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise FDFastError(f"cannot initialise a {type(head).__name__} head; fine-tune a model whose classifier is Linear")
    with torch.no_grad():
        nn.init.trunc_normal_(head.weight, std=0.02, a=-0.04, b=0.04)  # cut at 2 std (a, b are absolute)
        head.weight.mul_(scale)
        if head.bias is not None:
            head.bias.zero_()


def _timm_class(timm_name: str, kwargs: dict) -> type:
    """The class timm builds for ``timm_name`` (made on the meta device: no memory, no init compute)."""
    import timm
    plain = {k: v for k, v in kwargs.items() if k != "img_size"}
    try:
        with torch.device("meta"):
            return type(timm.create_model(timm_name, pretrained=False, **plain))
    except TypeError as e:
        raise FDFastError(f"timm {timm_name} rejects the kwargs {sorted(plain)}: {e}") from None


def _init_params(cls) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters)


def _with_size(kwargs: dict, size: int, cls) -> dict:
    """img_size for architectures that take one (ViT, BEiT, Swin); CNNs take any size."""
    if "img_size" in _init_params(cls):
        return dict(kwargs, img_size=size)
    return {k: v for k, v in kwargs.items() if k != "img_size"}


def _patch_of(timm_name: str, kwargs: dict) -> int | None:
    if "patch_size" in kwargs:
        p = kwargs["patch_size"]
        return int(p[0] if isinstance(p, (list, tuple)) else p)
    import re
    m = re.search(r"patch(\d+)", timm_name)
    return int(m.group(1)) if m else None


def _check_patch(patch: int | None, size: int, source: str) -> None:
    if patch and size % patch:
        lo = max(patch, size // patch * patch)
        raise FDFastError(f"MODEL {source!r} has {patch} px patches: an image size of {size} px is not a whole patch "
                          f"grid; set data.img_size to a multiple of {patch} (e.g. {lo} or {lo + patch})")


def _default_size(backbone: Backbone) -> int:
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(backbone.timm_name)
    return int(cfg.to_dict().get("input_size", (3, 224, 224))[-1]) if cfg is not None else 224


def classifier_metadata(clf: Classifier, classes: list[str]) -> dict:
    """safetensors metadata that makes a saved classifier a timm export fdfast reads back (``load_timm_export``)."""
    return {"timm_model": clf.timm_name, "timm_kwargs": json.dumps(clf.timm_kwargs), "format": "pt",
            MEAN_KEY: json.dumps(list(clf.mean)), STD_KEY: json.dumps(list(clf.std)), CLASSES_KEY: json.dumps(classes)}
