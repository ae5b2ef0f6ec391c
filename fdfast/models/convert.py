"""Read released checkpoints and convert each family's key layout to timm's, then load STRICTLY.

One ``filter_<family>(state_dict, model) -> state_dict`` per published layout (timm's
``checkpoint_filter_fn`` pattern). A filter renames and drops only what the family's release is known to
carry beside the backbone (heads, decoders, mask tokens, non-persistent index buffers); everything else
must match the timm model exactly, or ``load_strict`` raises an FDFastError listing the missing /
unexpected keys and shape mismatches. Nothing is ever loaded with ``strict=False``.
"""
from __future__ import annotations

import re
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from fdfast.errors import FDFastError

# containers released checkpoints wrap their weights in, in the order they are looked for
CONTAINERS = ("model", "state_dict", "module", "model_ema")


def read_weights(path) -> dict:
    """A weights file (safetensors, torch pickle, or TorchScript archive like OpenAI's CLIP .pt) as a dict."""
    path = Path(path)
    if not path.is_file():
        raise FDFastError(f"weights file {str(path)!r} does not exist; pass an existing file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return dict(load_file(str(path)))
        except Exception as e:  # safetensors raises its own error types
            raise FDFastError(f"weights file {str(path)!r} is not a readable safetensors file: {e}") from None
    if _is_torchscript(path):  # OpenAI CLIP releases TorchScript archives; only the weights are read
        try:
            with warnings.catch_warnings():  # torch.jit.load is deprecated; only the weights are read
                warnings.simplefilter("ignore", FutureWarning)
                return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        except Exception as e:
            raise FDFastError(f"weights file {str(path)!r} is a TorchScript archive that cannot be read: {e}") from None
    return torch_load_checkpoint(path)


def _benign_globals() -> dict:
    """Non-tensor objects research checkpoints pickle beside the weights (argparse args, yacs configs, numpy
    scalars): plain data, allowed for weights_only loading by their exact names."""
    import argparse
    import numpy as np
    allowed = {"argparse.Namespace": argparse.Namespace, "numpy.dtype": np.dtype}
    for name in ("numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar"):
        module, _, attr = name.rpartition(".")
        try:
            allowed[name] = getattr(__import__(module, fromlist=[attr]), attr)
        except (ImportError, AttributeError):
            pass
    allowed.update({f"numpy.dtypes.{t.__name__}": t for t in vars(np.dtypes).values() if isinstance(t, type)})
    try:
        from yacs.config import CfgNode  # the official FD / Swin trainers pickle their config
        allowed["yacs.config.CfgNode"] = CfgNode
    except ImportError:
        pass
    return allowed


def torch_load_checkpoint(path) -> dict:
    """torch.load(weights_only=True), also for checkpoints that pickle benign metadata beside the weights."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).splitlines()[0]
    try:
        needed = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:
        needed = None
    allowed = _benign_globals()
    if needed and all(n in allowed for n in needed):
        with torch.serialization.safe_globals([allowed[n] for n in needed]):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    what = f"it pickles {needed}" if needed else first
    raise FDFastError(f"weights file {str(path)!r} cannot be read with torch.load(weights_only=True) ({what}); "
                      f"re-save only its weights, e.g. torch.save({{'model': ckpt['model']}}, FILE), or as safetensors")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def unwrap(obj, prefer=()) -> dict:
    """The tensor dict inside a checkpoint container ({"model": ...}, {"teacher": ...}, ...)."""
    for key in tuple(prefer) + CONTAINERS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            return unwrap(obj[key], prefer)
    if not isinstance(obj, dict):
        raise FDFastError(f"expected a state dict, found a {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def strip_prefix(sd: dict, *prefixes: str) -> dict:
    for p in prefixes:
        if sd and all(k.startswith(p) for k in sd):
            sd = {k[len(p):]: v for k, v in sd.items()}
    return sd


def select_prefix(sd: dict, prefix: str) -> dict:
    """Only the sub-module under ``prefix`` (e.g. a MultiCropWrapper's ``backbone.``), when the file has one."""
    if any(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def drop(sd: dict, *patterns: str) -> dict:
    """Keys matching any regex in ``patterns`` removed (heads and buffers the release carries)."""
    rx = re.compile("|".join(patterns))
    return {k: v for k, v in sd.items() if not rx.search(k)}


# ---- resampling to the model's input size -------------------------------------------------------------

def fit_pos_embed(sd: dict, model: nn.Module) -> dict:
    """Resample an absolute position embedding to the model's token grid (timm's resample_abs_pos_embed)."""
    from timm.layers import resample_abs_pos_embed
    target = getattr(model, "pos_embed", None)
    if "pos_embed" not in sd or not isinstance(target, torch.Tensor) or sd["pos_embed"].shape == target.shape:
        return sd
    v = sd["pos_embed"]
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    n_old = v.shape[1] - prefix
    side = int(round(n_old ** 0.5))
    if v.dim() != 3 or side * side != n_old or v.shape[-1] != target.shape[-1]:
        return sd  # not a square map of the right width: load_strict reports the mismatch
    sd = dict(sd)
    sd["pos_embed"] = resample_abs_pos_embed(v, new_size=list(model.patch_embed.grid_size), old_size=[side, side],
                                             num_prefix_tokens=prefix, verbose=False)
    return sd


def fit_rel_pos_tables(sd: dict, model: nn.Module) -> dict:
    """Resize relative position bias tables (BEiT, Swin) to the model's window (timm's resize_rel_pos_bias_table)."""
    from timm.layers import resize_rel_pos_bias_table
    own = model.state_dict()
    sd = dict(sd)
    for k, v in sd.items():
        if k.endswith("relative_position_bias_table") and k in own and own[k].shape != v.shape \
                and v.shape[-1] == own[k].shape[-1]:
            module = model.get_submodule(k.rsplit(".", 1)[0])
            window = getattr(module, "window_size", None)
            if window is None:
                continue
            sd[k] = resize_rel_pos_bias_table(v, new_window_size=tuple(window), new_bias_shape=own[k].shape)
    return sd


# ---- per-family filters: release layout -> timm layout --------------------------------------------------

def filter_timm(sd: dict, model: nn.Module) -> dict:
    """A timm state dict (the classifier dropped: teachers are built with num_classes=0)."""
    sd = strip_prefix(unwrap(sd), "module.")
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "head")
    names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    own = model.state_dict()
    sd = {k: v for k, v in sd.items()
          if k in own or not any(k == n or k.startswith(n + ".") for n in names)}
    return fit_rel_pos_tables(fit_pos_embed(sd, model), model)


def filter_dino(sd: dict, model: nn.Module) -> dict:
    """DINO (facebookresearch/dino): backbone-only *_pretrain.pth, or a full checkpoint (teacher weights)."""
    sd = select_prefix(strip_prefix(unwrap(sd, prefer=("teacher",)), "module."), "backbone.")
    return fit_pos_embed(drop(sd, r"^head\."), model)


def filter_dinov2(sd: dict, model: nn.Module) -> dict:
    """DINOv2 (facebookresearch/dinov2) *_pretrain.pth: mask token dropped; registers to timm's reg_token."""
    sd = dict(select_prefix(strip_prefix(unwrap(sd, prefer=("teacher",)), "module."), "backbone."))
    sd.pop("mask_token", None)
    if "register_tokens" in sd:  # timm's reg models keep no position embedding for prefix tokens
        sd["reg_token"] = sd.pop("register_tokens")
        sd["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, :1]
        sd["pos_embed"] = sd["pos_embed"][:, 1:]
    sd = {re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", k)): v for k, v in sd.items()}
    return fit_pos_embed(sd, model)


def filter_deit(sd: dict, model: nn.Module) -> dict:
    """DeiT / DeiT III (facebookresearch/deit) {"model": ...}: classifier dropped; gamma_N -> lsN.gamma."""
    sd = strip_prefix(unwrap(sd), "module.")
    sd = drop(sd, r"^head\.", r"^head_dist\.")
    sd = {re.sub(r"\.gamma_([12])$", r".ls\1.gamma", k): v for k, v in sd.items()}
    return fit_pos_embed(sd, model)


def filter_mae(sd: dict, model: nn.Module) -> dict:
    """MAE (facebookresearch/mae) {"model": ...}: the encoder; decoder and mask token dropped."""
    sd = strip_prefix(unwrap(sd), "module.")
    return fit_pos_embed(drop(sd, r"^decoder_", r"^mask_token$", r"^head\."), model)


def filter_beit(sd: dict, model: nn.Module) -> dict:
    """BEiT / BEiT v2 (microsoft/unilm) {"model": ...}: MIM head, mask token, BEiT v2's cls_pt_layers dropped."""
    sd = strip_prefix(unwrap(sd), "module.", "encoder.")
    sd = drop(sd, r"^lm_head\.", r"^mask_token$", r"^cls_pt_layers\.", r"relative_position_index$", r"^head\.")
    return fit_rel_pos_tables(fit_pos_embed(sd, model), model)


def beit_arch(sd: dict) -> dict:
    """BEiT kwargs the weights imply: shared vs per-block relative position bias, absolute position embedding."""
    sd = strip_prefix(unwrap(sd), "module.", "encoder.")
    return dict(use_abs_pos_emb="pos_embed" in sd,
                use_shared_rel_pos_bias="rel_pos_bias.relative_position_bias_table" in sd,
                use_rel_pos_bias="blocks.0.attn.relative_position_bias_table" in sd)


def filter_eva02(sd: dict, model: nn.Module) -> dict:
    """EVA-02 (baaivision/EVA) MIM checkpoints: SwiGLU w1/w2/w3 + ffn_ln, q_bias/v_bias; rope buffers dropped."""
    sd = strip_prefix(unwrap(sd, prefer=("model_ema",)), "module.")
    sd = drop(sd, r"^mask_token$", r"^lm_head\.", r"(^|\.)rope\.", r"^head\.")
    swaps = [(".mlp.ffn_ln.", ".mlp.norm."), (".attn.inner_attn_ln.", ".attn.norm."), (".mlp.w12.", ".mlp.fc1."),
             (".mlp.w1.", ".mlp.fc1_g."), (".mlp.w2.", ".mlp.fc1_x."), (".mlp.w3.", ".mlp.fc2."),
             (".attn.q_bias", ".attn.q_proj.bias"), (".attn.v_bias", ".attn.v_proj.bias")]
    out = {}
    for k, v in sd.items():
        for a, b in swaps:
            k = k.replace(a, b)
        out[k] = v
    return fit_pos_embed(out, model)


def filter_clip(sd: dict, model: nn.Module) -> dict:
    """CLIP image tower, OpenAI (.pt) or open_clip layout -> timm CLIP ViT; text tower and ``proj`` dropped.

    FD's CLIP target is the tokens after ``ln_post`` (timm's ``norm``), before the projection.
    """
    sd = strip_prefix(unwrap(sd), "module.")
    if any(k.startswith("visual.") for k in sd):
        sd = {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    swaps = [("conv1.", "patch_embed.proj."), ("transformer.resblocks.", "blocks."), ("ln_pre.", "norm_pre."),
             ("ln_post.", "norm."), (".ln_1.", ".norm1."), (".ln_2.", ".norm2."),
             (".attn.in_proj_weight", ".attn.qkv.weight"), (".attn.in_proj_bias", ".attn.qkv.bias"),
             (".attn.out_proj.", ".attn.proj."), (".mlp.c_fc.", ".mlp.fc1."), (".mlp.c_proj.", ".mlp.fc2.")]
    out = {}
    for k, v in sd.items():
        if k == "proj":  # image projection to the joint space: FD reads tokens before it
            continue
        if k == "class_embedding":
            k, v = "cls_token", v.reshape(1, 1, -1)
        elif k == "positional_embedding":
            k, v = "pos_embed", v.unsqueeze(0)
        for a, b in swaps:
            if k.startswith(a) or a.startswith("."):
                k = k.replace(a, b)
        out[k] = v
    return fit_pos_embed(out, model)


def _swin_common(sd: dict, model: nn.Module) -> dict:
    sd = drop(sd, r"relative_position_index$", r"relative_coords_table$", r"attn_mask$", r"^head\.", r"^head_dense\.")
    if "layers.0.downsample.reduction.weight" in sd:  # Microsoft layout: PatchMerging ends a stage; timm: starts the next
        sd = {re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", k): v
              for k, v in sd.items()}
    return fit_rel_pos_tables(sd, model)


def filter_swin(sd: dict, model: nn.Module) -> dict:
    """Swin (microsoft/Swin-Transformer) {"model": ...} -> timm SwinTransformer."""
    return _swin_common(strip_prefix(unwrap(sd), "module."), model)


def filter_esvit(sd: dict, model: nn.Module) -> dict:
    """EsViT (microsoft/esvit) checkpoint: the ``student`` weights, ``module.backbone.`` prefix, DINO heads dropped."""
    sd = unwrap(sd, prefer=("student",))
    sd = select_prefix(strip_prefix(sd, "module."), "backbone.")  # MultiCropWrapper: backbone + head (+ head_dense)
    return _swin_common(sd, model)


def filter_swinv2(sd: dict, model: nn.Module) -> dict:
    """SwinV2 (microsoft/Swin-Transformer) {"model": ...} -> timm SwinTransformerV2."""
    return _swin_common(strip_prefix(unwrap(sd), "module."), model)


FILTERS = {
    "timm": filter_timm, "dino": filter_dino, "dinov2": filter_dinov2, "deit": filter_deit, "mae": filter_mae,
    "beit": filter_beit, "eva02": filter_eva02, "clip": filter_clip, "swin": filter_swin, "esvit": filter_esvit,
    "swinv2": filter_swinv2, "cnn": filter_timm,
}


# ---- strict load ------------------------------------------------------------------------------------------

def _listing(items, n=8) -> str:
    items = list(items)
    more = f", ... ({len(items)} in all)" if len(items) > n else ""
    return "[" + ", ".join(items[:n]) + more + "]"


def key_problems(expected_shapes: dict, sd: dict, source: str = "file", target: str = "model") -> list[str]:
    """What keeps ``sd`` from loading strictly into a state dict of ``expected_shapes`` (key -> shape): missing
    keys, unexpected keys, shape mismatches, each as one listing; empty when it fits."""
    missing = [k for k in expected_shapes if k not in sd]
    unexpected = [k for k in sd if k not in expected_shapes]
    mismatched = [f"{k}: {source} {tuple(sd[k].shape)} vs {target} {tuple(expected_shapes[k])}"
                  for k in expected_shapes if k in sd and tuple(sd[k].shape) != tuple(expected_shapes[k])]
    parts = []
    if missing:
        parts.append(f"missing keys {_listing(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {_listing(unexpected)}")
    if mismatched:
        parts.append(f"shape mismatches {_listing(mismatched)}")
    return parts


def load_strict_check(model: nn.Module, sd: dict, what: str, fix: str) -> None:
    """Raise an FDFastError listing every missing / unexpected key and shape mismatch, naming the fix."""
    parts = key_problems({k: v.shape for k, v in model.state_dict().items()}, sd)
    if parts:
        raise FDFastError(f"{what} do not fit {type(model).__name__}: " + "; ".join(parts) + f". {fix}")


def load_strict(model: nn.Module, sd: dict, what: str, fix: str) -> None:
    """load_state_dict(strict=True), after a check whose error lists every problem and names the fix."""
    load_strict_check(model, sd, what, fix)
    model.load_state_dict(sd, strict=True)
