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
``finetune_state_dict(state_dict)``: the final norm's weights start the fc_norm (timm does the same for
EVA-02 MIM weights), the head is new.

``--to fdfast`` writes a student.safetensors in fdfast's own format (``fdfast_model`` metadata), e.g. to
fine-tune, diagnose or export an imported official FD checkpoint (fdfast.models.official).
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
    `fdfast export --to timm` file, or an official FD checkpoint (.pth), loaded strictly."""
    from fdfast.checkpoint import verify_file
    from fdfast.models.student import build_student
    if Path(path).is_file():  # a damaged file is one line naming it (checked against its COMMITTED record)
        verify_file(path)
    if _is_timm_export(path):
        return load_timm_export(path)
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
    """An exported ViT state dict for timm BEiT ``use_fc_norm=True``: the final norm starts the fc_norm."""
    return {("fc_norm." + k[len("norm."):] if k.startswith("norm.") else k): v for k, v in sd.items()}


def create_timm_model(timm_model: str, timm_kwargs: dict, device=None) -> nn.Module:
    import timm
    if device is not None:
        with torch.device(device):
            return timm.create_model(timm_model, pretrained=False, **timm_kwargs)
    return timm.create_model(timm_model, pretrained=False, **timm_kwargs)


def export(src, out, to: str = "timm") -> Path:
    """Write the student of ``src`` to ``out`` (.safetensors) as a plain timm model (or fdfast's format)."""
    from fdfast.checkpoint import atomic_save_safetensors
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
        raise FDFastError(f"--to must be timm or fdfast, got {to!r}")
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


# ---- `fdfast export` ----------------------------------------------------------------------------------------

def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="write a student as a timm model file (per-block RPB BEiT or SwinV2)",
                              description="Export the student of a run, a checkpoints/step-N dir, a student "
                                          ".safetensors or an official FD checkpoint (.pth).")
    p.add_argument("ckpt", metavar="RUN_OR_CKPT")
    p.add_argument("--to", default="timm", choices=["timm", "fdfast"],
                   help="timm: a plain timm model (metadata timm_model + timm_kwargs); fdfast: fdfast's student format")
    p.add_argument("--out", required=True, metavar="FILE.safetensors")
    p.set_defaults(func=_run)


def _run(args) -> int:
    out = export(args.ckpt, args.out, args.to)
    if args.to == "timm":
        from safetensors import safe_open
        with safe_open(str(out), framework="pt") as f:
            meta = f.metadata()
        print(f"wrote {out}: timm.create_model({meta[TIMM_MODEL_KEY]!r}, **json.loads(metadata['timm_kwargs'])) "
              f"loads it with strict=True")
    else:
        print(f"wrote {out} (fdfast student format)")
    return 0
