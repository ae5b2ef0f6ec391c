"""Checkpoints that travel: a student -> a timm model file, and back (``load_student``).

``fdfast export RUN_OR_CKPT --to timm --out FILE.safetensors`` writes the student as a plain timm model:
- ViT student (timm ``Beit`` with ONE shared relative position bias table) -> timm ``Beit`` with a table in
  every block (the shared table copied into each, as FD fine-tunes, METHOD.md). Features are equal.
- SwinV2 student -> timm ``SwinTransformerV2`` as is.
The safetensors metadata carries ``timm_model`` and ``timm_kwargs`` (JSON):
``timm.create_model(timm_model, **json.loads(timm_kwargs))`` loads the file with ``strict=True``.

The final norm: the FD student ends with ``norm`` (LayerNorm over every token, FD's target side) and has
no ``fc_norm``. timm's BEiT fine-tuning default (``use_fc_norm=True``) would replace that norm by an
Identity and normalise only the pooled vector, changing the features; so the export keeps
``use_fc_norm=False, global_pool="avg", num_classes=0``: ``forward_features`` equals the student's tokens
and the pooled feature is the mean of the normalised patch tokens. For the paper's fine-tuning head
(mean pool -> fc_norm -> head) create the model with ``use_fc_norm=True, num_classes=N`` and load
``finetune_state_dict(state_dict)``: the final norm's weights are dropped (its module is an Identity there), the
fc_norm and the head are new, as in the published FD / BEiT / MAE fine-tuning code and ``fdfast finetune``.

``--to fdfast`` writes a student.safetensors in fdfast's own format (``fdfast_model`` metadata), e.g. to
fine-tune, diagnose or export an imported official FD checkpoint (fdfast.models.official).

``--to timm-dir --out DIR`` writes the same model as a timm model folder, what ``huggingface_hub.upload_folder``
pushes and ``timm.create_model("local-dir:DIR", pretrained=True)`` (or ``hf-hub:USER/REPO`` once uploaded)
rebuilds with no other argument: ``config.json`` written by timm's own ``save_for_hf`` (architecture,
``model_args`` with every constructor argument, ``pretrained_cfg`` with the input size, the teacher's mean / std
the student was distilled with, the evaluation crop), ``model.safetensors`` and a ``README.md`` model card (teacher,
recipe, steps, final FD loss, fdfast version, how to load and fine-tune).
"""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import torch
from torch import nn

from fdfast.errors import FDFastError
from fdfast.models import convert, tokens

TIMM_MODEL_KEY, TIMM_KWARGS_KEY = "timm_model", "timm_kwargs"
STUDENT_META_KEY = "fdfast_model"  # the same key as fdfast.checkpoint.STUDENT_META_KEY

# timm architecture names whose defaults the exported kwargs override completely
_VIT_TIMM = {"large": "beit_large_patch16_224"}
_SWINV2_TIMM = {"tiny": "swinv2_tiny_window8_256", "small": "swinv2_small_window8_256",
                "large": "swinv2_large_window12_192"}


def read_any_student(path) -> tuple[dict, dict]:
    """(ModelConfig dict, timm state dict) of a run dir, step dir, fdfast .safetensors, or official FD .pth."""
    path = Path(path)
    if not path.exists():
        raise FDFastError(f"no such run or checkpoint: {path}")
    if path.is_file() and path.suffix != ".safetensors":
        from fdfast.models.official import read_official
        model_cfg, sd, _ = read_official(path)
        return model_cfg, sd
    from fdfast.checkpoint import read_student
    return read_student(path)


def model_config(model_cfg: dict):
    """A ``config.ModelConfig`` from its dict (as stored in checkpoints); unknown keys are errors."""
    from fdfast.config import ModelConfig
    names = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(model_cfg) - names)
    if unknown:
        raise FDFastError(f"checkpoint student description has unknown keys {unknown}; it was written by a "
                          f"newer fdfast, upgrade fdfast to read it")
    return ModelConfig(**model_cfg)


def load_student(path) -> nn.Module:
    """The student (a timm model, eval mode) of a run dir, a checkpoints/step-N dir, a student .safetensors, an
    `fdfast export --to timm` file or `--to timm-dir` folder, or an official FD checkpoint (.pth), loaded strictly."""
    from fdfast.checkpoint import verify_file
    from fdfast.models.student import build_student
    if Path(path).is_file():  # a damaged file is one line naming it (checked against its COMMITTED record)
        verify_file(path)
    if _is_timm_export(path):
        return load_timm_export(path)
    if is_timm_dir(path):
        return load_timm_dir(path)
    model_cfg, sd = read_any_student(path)
    model = build_student(model_config(model_cfg))
    convert.load_strict(model, sd, f"student weights in {str(path)!r}",
                        "The checkpoint and its stored model description disagree; re-export it from its run")
    return model.eval()


# ---- the timm export ------------------------------------------------------------------------------------

def timm_export(model_cfg: dict, sd: dict) -> tuple[str, dict, dict]:
    """(timm_model, timm_kwargs, state dict) of the plain timm model equal to the student."""
    cfg = model_config(model_cfg)
    if cfg.arch == "vit":
        from fdfast.models.student import vit_student_kwargs
        pos_bias = "abs" if cfg.pos_bias == "abs" else "per_block"
        kwargs = vit_student_kwargs(cfg.size, cfg.patch_size, cfg.img_size, 0.0, pos_bias, **dict(cfg.kwargs))
        kwargs.pop("drop_path_rate")  # training-time setting: fine-tuning chooses its own
        if cfg.pos_bias == "shared":
            sd = per_block_rel_pos_bias(sd, kwargs["depth"])
        return _VIT_TIMM.get(cfg.size, "beit_base_patch16_224"), kwargs, sd
    if cfg.arch == "swinv2":
        from fdfast.models.swinv2 import swinv2_student_kwargs, SWINV2_PATCH, VIT_DEFAULT_PATCH
        extra = dict(cfg.kwargs)
        extra.setdefault("patch_size", cfg.patch_size if cfg.patch_size != VIT_DEFAULT_PATCH else SWINV2_PATCH)
        kwargs = swinv2_student_kwargs(cfg.size, cfg.img_size, 0.0, **extra)
        kwargs.pop("drop_path_rate")
        return _SWINV2_TIMM.get(cfg.size, "swinv2_base_window8_256"), kwargs, dict(sd)
    raise FDFastError(f"cannot export a student of arch {cfg.arch!r} to timm; vit and swinv2 students export")


def per_block_rel_pos_bias(sd: dict, depth: int) -> dict:
    """The shared RPB table copied into every block's own table (timm BEiT ``use_rel_pos_bias``)."""
    key = "rel_pos_bias.relative_position_bias_table"
    if key not in sd:
        raise FDFastError(f"the student has pos_bias 'shared' but its weights lack {key!r}")
    out = {k: v for k, v in sd.items() if not k.startswith("rel_pos_bias.")}
    for i in range(depth):
        out[f"blocks.{i}.attn.relative_position_bias_table"] = sd[key].clone()
    return out


def finetune_state_dict(sd: dict) -> dict:
    """An exported ViT state dict for timm BEiT ``use_fc_norm=True``: everything but the final norm (the fc_norm
    and the head keep their new init)."""
    return {k: v for k, v in sd.items() if not k.startswith("norm.")}


def create_timm_model(timm_model: str, timm_kwargs: dict, device=None) -> nn.Module:
    import timm
    if device is not None:
        with torch.device(device):
            return timm.create_model(timm_model, pretrained=False, **timm_kwargs)
    return timm.create_model(timm_model, pretrained=False, **timm_kwargs)


def export(src, out, to: str = "timm") -> Path:
    """Write the student of ``src`` to ``out`` (.safetensors) as a plain timm model (or fdfast's format), or to the
    folder ``out`` as a timm model folder (to="timm-dir")."""
    from fdfast.checkpoint import atomic_save_safetensors
    if to == "timm-dir":
        return export_timm_dir(src, out)
    out = Path(out)
    if out.suffix != ".safetensors":
        raise FDFastError(f"--out must be a .safetensors file, got {str(out)!r}")
    model_cfg, sd = read_any_student(src)
    if to == "fdfast":
        model_config(model_cfg)  # validate
        meta = {STUDENT_META_KEY: json.dumps(model_cfg)}
    elif to == "timm":
        timm_model, timm_kwargs, sd = timm_export(model_cfg, sd)
        # check on the meta device (no memory, no compute) that timm takes the file strictly and gives the
        # student's tokens (same grid, prefix tokens and width)
        exported = create_timm_model(timm_model, timm_kwargs, "meta")
        convert.load_strict_check(exported, sd, f"exported weights of {str(src)!r}",
                                  "This is an fdfast bug; please report it")
        _check_same_tokens(model_cfg, exported)
        meta = {TIMM_MODEL_KEY: timm_model, TIMM_KWARGS_KEY: json.dumps(timm_kwargs), "format": "pt"}
    else:
        raise FDFastError(f"--to must be timm, timm-dir or fdfast, got {to!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with _run_dir_locked(out.parent):
        atomic_save_safetensors(sd, out, metadata=meta)
    return out


def _run_dir_locked(folder: Path):
    """Writing into a run directory: hold its lock (a training or fine-tuning run there stops us with exit 2)."""
    import contextlib
    from fdfast.io import run_dir_lock
    if any((folder / n).exists() for n in ("config.yaml", "checkpoints", ".lock")):
        return run_dir_lock(folder, "fdfast export")
    return contextlib.nullcontext()


def _check_same_tokens(model_cfg: dict, exported: nn.Module) -> None:
    from fdfast.models.student import build_student
    with torch.device("meta"):
        student = build_student(model_config(model_cfg))
    if tokens.geometry(student) != tokens.geometry(exported):
        raise FDFastError(f"the timm export's tokens {tokens.geometry(exported)} differ from the student's "
                          f"{tokens.geometry(student)}; this is an fdfast bug, please report it")


def _is_timm_export(path) -> bool:
    from safetensors import safe_open
    path = Path(path)
    if not (path.is_file() and path.suffix == ".safetensors"):
        return False
    with safe_open(str(path), framework="pt") as f:
        return TIMM_MODEL_KEY in (f.metadata() or {})


def load_timm_export(path) -> nn.Module:
    """Recreate an exported file's timm model from its metadata and load it strictly (what a user does)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if TIMM_MODEL_KEY not in meta:
        raise FDFastError(f"{path} has no {TIMM_MODEL_KEY!r} metadata; it was not written by `fdfast export --to timm`")
    model = create_timm_model(meta[TIMM_MODEL_KEY], json.loads(meta[TIMM_KWARGS_KEY]))
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval()


# ---- the timm model folder --------------------------------------------------------------------------------

EVAL_CROP_PCT = 0.875  # the evaluation crop fine-tuning uses by default (fdfast.finetune.config: data.crop_pct)
TIMM_DIR_FILES = ("config.json", "model.safetensors", "README.md")


def export_timm_dir(src, out) -> Path:
    """Write the student of ``src`` as a timm model folder ``out`` (config.json, model.safetensors, README.md)."""
    from timm.models import save_for_hf
    from fdfast.io import atomic_dir
    out = Path(out).expanduser()
    if out.suffix == ".safetensors" or (out.exists() and not out.is_dir()):
        raise FDFastError(f"--to timm-dir writes a folder; --out {str(out)!r} is a file name (use --to timm for one "
                          f"file)")
    if out.is_dir() and any(out.iterdir()):
        raise FDFastError(f"--out {str(out)!r} is not empty; export into a new folder")
    model_cfg, sd = read_any_student(src)
    timm_model, timm_kwargs, sd = timm_export(model_cfg, sd)
    run = run_summary(src, model_cfg)
    pretrained_cfg = _pretrained_cfg(timm_model, int(model_config(model_cfg).img_size), run["mean"], run["std"])
    # built on the meta device and given the weights by reference: no copy of a large model in memory
    model = create_timm_model(timm_model, dict(timm_kwargs, pretrained_cfg=pretrained_cfg), "meta")
    convert.load_strict_check(model, sd, f"exported weights of {str(src)!r}", "This is an fdfast bug; please report it")
    model.load_state_dict(sd, strict=True, assign=True)
    _check_same_tokens(model_cfg, model)
    card = model_card(out.name, timm_model, timm_kwargs, pretrained_cfg, run, tokens.geometry(model))
    with atomic_dir(out) as tmp:
        save_for_hf(model, tmp, model_args=timm_kwargs, safe_serialization=True)
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return out


def is_timm_dir(path) -> bool:
    """A timm model folder (config.json beside the weights) that is not an fdfast run directory."""
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file() and not (path / "config.yaml").exists()


def load_timm_dir(path) -> nn.Module:
    """``timm.create_model("local-dir:PATH", pretrained=True)``, checked: every weight in the folder loads (timm's
    own load is strict only while the head matches, which it does with no arguments)."""
    import timm
    try:
        model = timm.create_model(f"local-dir:{Path(path).resolve()}", pretrained=True)
    except (RuntimeError, ValueError, KeyError, FileNotFoundError) as e:
        raise FDFastError(f"{path} is not a timm model folder timm can load ({str(e).splitlines()[0][:200]}); "
                          f"write one with `fdfast export RUN --to timm-dir --out DIR`") from None
    return model.eval()


def _pretrained_cfg(timm_model: str, img_size: int, mean, std) -> dict:
    """timm's pretrained config of the export: the architecture's structure keys, fdfast's input processing."""
    from timm.models import get_pretrained_cfg
    base = get_pretrained_cfg(timm_model)
    base = base.to_dict() if base is not None else {}
    return dict(architecture=timm_model, input_size=(3, img_size, img_size), fixed_input_size=True,
                mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std), crop_pct=EVAL_CROP_PCT,
                crop_mode="center", interpolation="bilinear",  # fdfast's loaders resize bilinearly
                num_classes=0, first_conv=base.get("first_conv", "patch_embed.proj"),
                classifier=base.get("classifier", "head"))


def run_summary(src, model_cfg: dict) -> dict:
    """What a model card says about the run behind ``src``: teacher, recipe, steps, final FD loss, normalisation.

    Read from the run's config.yaml and metrics.jsonl when ``src`` lies in a run; "unknown" otherwise (an
    official checkpoint, a copied student file). mean / std: the teacher's (ImageNet's without a run).
    """
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from fdfast.diagnostics.inputs import find_run_config
    src = Path(src)
    cfg = find_run_config(src) or {}
    teacher = cfg.get("teacher") if isinstance(cfg.get("teacher"), dict) else {}
    out = dict(teacher=teacher.get("name") or "unknown", teacher_weights=teacher.get("weights"),
               recipe=cfg.get("recipe") or "unknown", steps=None, total_steps=(cfg.get("optim") or {}).get("steps"),
               loss=None, mean=tuple(IMAGENET_DEFAULT_MEAN), std=tuple(IMAGENET_DEFAULT_STD),
               norm="ImageNet's: no run config names the teacher")
    if teacher.get("name"):
        from fdfast.models.teachers import get_entry
        entry = get_entry(teacher["name"])
        out["mean"], out["std"], out["norm"] = tuple(entry.mean), tuple(entry.std), "the teacher's"
    if not cfg:
        return out
    step_dir = src if src.is_dir() and src.parent.name == "checkpoints" else None
    run_dir = step_dir.parent.parent if step_dir else (src if src.is_dir() else src.parent)
    rows = _metrics_rows(run_dir / "metrics.jsonl")
    if step_dir is not None and step_dir.name.split("-")[-1].isdigit():
        out["steps"] = int(step_dir.name.split("-")[-1])
    elif rows:
        out["steps"] = int(rows[-1]["step"])
    logged = [r for r in rows if out["steps"] is None or int(r["step"]) <= out["steps"]]
    if logged:
        out["loss"], out["loss_step"] = float(logged[-1]["loss"]), int(logged[-1]["step"])
    return out


def _metrics_rows(path: Path) -> list[dict]:
    """The run's logged steps (rows with a step and a loss), in file order; a damaged line is skipped."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "step" in row and "loss" in row:
                rows.append(row)
    return rows


def model_card(name: str, timm_model: str, timm_kwargs: dict, pretrained_cfg: dict, run: dict,
               geom: tokens.TokenGeometry) -> str:
    """README.md of a timm model folder: Hugging Face model-card metadata, what the model is, how to use it."""
    from fdfast import __version__
    size = pretrained_cfg["input_size"][-1]
    weights = run["teacher_weights"]
    teacher = run["teacher"] + (f" (weights {Path(str(weights)).name})" if weights else "")
    layout = "[B, N, C]" if geom.layout == "vit" else "[B, h, w, C]"
    prefix = f"{geom.num_prefix_tokens} prefix token(s) + " if geom.num_prefix_tokens else ""
    steps = "unknown" if run["steps"] is None else f"{run['steps']}" + (
        f" of {run['total_steps']}" if run["total_steps"] and run["total_steps"] != run["steps"] else "")
    loss = "unknown" if run["loss"] is None else f"{run['loss']:.4f} (step {run['loss_step']}, metrics.jsonl)"
    args = ", ".join(f"{k}={v!r}" for k, v in timm_kwargs.items())

    def fmt(t):
        return "(" + ", ".join(f"{x:.4f}" for x in t) + ")"
    return f"""---
library_name: timm
license: other
pipeline_tag: image-feature-extraction
tags:
- image-feature-extraction
- timm
- fdfast
- feature-distillation
---
# {name}

A Feature Distillation student (Wei et al., 2022, "Contrastive Learning Rivals Masked Image Modeling in
Fine-tuning via Feature Distillation") trained with fdfast {__version__}: a timm `{timm_model}` whose tokens
after the final norm were distilled from the teacher's (whitened) tokens. Its weights are a backbone to
fine-tune; there is no classifier head (`num_classes=0`). The license follows the teacher's weights and the
training data.

## Model details
- **Architecture:** timm `{timm_model}`, `model_args` in config.json: {args}
- **Teacher:** {teacher}
- **Recipe:** {run['recipe']}
- **Steps:** {steps}
- **Final FD loss:** {loss}
- **Input:** {size} x {size} px, mean {fmt(pretrained_cfg['mean'])}, std {fmt(pretrained_cfg['std'])}
  ({run['norm']}), evaluation crop {pretrained_cfg['crop_pct']} ({pretrained_cfg['interpolation']})
- **Outputs:** `forward_features(x)`: the tokens after the final norm, {layout}: {prefix}{geom.grid[0]} x
  {geom.grid[1]} patch tokens of width {geom.dim}; `model(x)`: the mean of the normalised patch tokens
- **fdfast version:** {__version__}

## How to load
```python
import timm
model = timm.create_model("local-dir:{name}", pretrained=True)  # "hf-hub:USER/{name}" once uploaded
cfg = timm.data.resolve_data_config({{}}, model=model)  # input size, mean / std, crop of this folder
features = model.forward_features(images)
```

## How to fine-tune
With fdfast (METHOD.md's recipe: a new head on the mean-pooled tokens, layer decay, Mixup / CutMix, RandAugment;
RECIPE is one of fdfast's ft_* recipes, e.g. ft_demo):
```
fdfast finetune local-dir:{name} RECIPE --data DATA   # DATA/train and DATA/val hold class subfolders
```
With timm's train.py (a new `--num-classes` head on the mean-pooled tokens):
```
python train.py DATA --model local-dir:{name} --pretrained --num-classes N
```
"""


# ---- `fdfast export` ----------------------------------------------------------------------------------------

def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a student as a timm model file or folder (per-block RPB BEiT or "
                                             "SwinV2)",
                              description="Export the student of a run, a checkpoints/step-N dir, a student "
                                          ".safetensors or an official FD checkpoint (.pth).")
    p.add_argument("ckpt", metavar="RUN_OR_CKPT")
    p.add_argument("--to", default="timm", choices=["timm", "timm-dir", "fdfast"],
                   help="timm: a plain timm model file (metadata timm_model + timm_kwargs); timm-dir: a timm model "
                        "folder (config.json + model.safetensors + README.md) for timm.create_model('local-dir:DIR') "
                        "and the Hugging Face hub; fdfast: fdfast's student format")
    p.add_argument("--out", required=True, metavar="FILE.safetensors|DIR")
    p.set_defaults(func=_run)


def _run(args) -> int:
    from fdfast.io import WriteFailed
    try:
        out = export(args.ckpt, args.out, args.to)
    except WriteFailed as e:  # a full disk, an I/O error, a read-only folder: one line, the source untouched
        raise FDFastError(f"{e}; the checkpoint exported, {args.ckpt}, is untouched: {e.fix}, then export "
                          f"again") from None
    if args.to == "timm-dir":
        print(f"wrote {out}/ (config.json, model.safetensors, README.md): timm.create_model('local-dir:{out}', "
              f"pretrained=True) rebuilds it; huggingface_hub.upload_folder pushes it as is")
    elif args.to == "timm":
        from safetensors import safe_open
        with safe_open(str(out), framework="pt") as f:
            meta = f.metadata()
        print(f"wrote {out}: timm.create_model({meta[TIMM_MODEL_KEY]!r}, **json.loads(metadata['timm_kwargs'])) "
              f"loads it with strict=True")
    else:
        print(f"wrote {out} (fdfast student format)")
    return 0
