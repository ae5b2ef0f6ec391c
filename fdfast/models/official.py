"""Import ViT checkpoints of the official FD implementation (SwinTransformer/Feature-Distillation).

Its ViT is a BEiT-style model whose parameter names are timm BEiT's (patch_embed.proj, cls_token,
rel_pos_bias.relative_position_bias_table or per-block attn.relative_position_bias_table, attn.qkv.weight
without bias + attn.q_bias / attn.v_bias, gamma_1 / gamma_2, norm or fc_norm, head). Two layouts:
- FD stage (``main_fd.py``): ``{"model": FD.state_dict(), ...}``: the student under ``encoder.``, the 1x1
  projection as ``decoder.0`` (a Conv1d), the teacher under ``feature_model.``; final ``norm``, no head.
- fine-tune stage (``main_finetune.py``): ``{"model": ...}`` without prefix, per-block tables, mean
  pooling with ``fc_norm`` (``norm`` is an Identity there) and a classifier ``head``.
Both become an fdfast ViT student (timm ``Beit``) with its ModelConfig; index buffers are dropped, the
teacher copy is dropped, and every other key must load strictly.
"""
from __future__ import annotations

import re
from pathlib import Path

from fdfast.errors import FDFastError
from fdfast.models.convert import drop, torch_load_checkpoint, unwrap


def read_official(path) -> tuple[dict, dict, dict]:
    """(ModelConfig dict, timm Beit state dict, extras) of an official FD ViT checkpoint.

    extras: ``{"stage": "fd" | "finetune"}`` plus, for the FD stage, the projection as ``proj.weight`` /
    ``proj.bias`` (fdfast's FDLoss projection layout) when present.
    """
    path = Path(path)
    sd = unwrap(torch_load_checkpoint(path))
    extras: dict = {}
    if any(k.startswith("encoder.") for k in sd):
        extras["stage"] = "fd"
        if "decoder.0.weight" in sd:  # Conv1d(Cs -> Ct, kernel 1) == Linear
            extras["proj.weight"] = sd["decoder.0.weight"].squeeze(-1)
            extras["proj.bias"] = sd["decoder.0.bias"]
        sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    else:
        extras["stage"] = "finetune"
    if any(k.startswith("layers.") for k in sd):
        raise FDFastError(f"{path} holds an official FD Swin/SwinV2 student; only its ViT checkpoints import")
    if "patch_embed.proj.weight" not in sd or not any(k.startswith("blocks.") for k in sd):
        raise FDFastError(f"{path} is not an official FD ViT checkpoint (no patch_embed.proj.weight / blocks.*)")
    sd = drop(sd, r"relative_position_index$")
    for k in [k for k in sd if k.endswith("attn.k_bias")]:  # with_k_bias: timm BEiT's k bias is fixed at 0
        if sd[k].abs().max() > 0:
            raise FDFastError(f"{path} was trained with a learned key bias ({k}); timm's BEiT has none, so it "
                              f"cannot be imported exactly")
        del sd[k]
    return _model_config(sd, path), sd, extras


def _model_config(sd: dict, path: Path) -> dict:
    """The fdfast ModelConfig (as a dict) the weights imply."""
    from fdfast.models.student import VIT_PRESETS
    width, _, patch, _ = sd["patch_embed.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    if "rel_pos_bias.relative_position_bias_table" in sd:
        pos_bias, table = "shared", sd["rel_pos_bias.relative_position_bias_table"]
    elif "blocks.0.attn.relative_position_bias_table" in sd:
        pos_bias, table = "per_block", sd["blocks.0.attn.relative_position_bias_table"]
    elif "pos_embed" in sd:
        pos_bias, table = "abs", None
    else:
        raise FDFastError(f"{path}: the ViT has neither a relative position bias table nor a position embedding")
    has_cls = "cls_token" in sd
    if table is not None:
        side = (int(round((table.shape[0] - 3 * has_cls) ** 0.5)) + 1) // 2  # rows = (2G-1)^2 (+3 with CLS)
        heads = table.shape[1]
    else:
        side = int(round((sd["pos_embed"].shape[1] - has_cls) ** 0.5))
        heads = None
    kwargs: dict = {}
    size = next((s for s, (w, d, h) in VIT_PRESETS.items() if w == width and d == depth and heads in (None, h)), None)
    if size is None:
        if heads is None:
            raise FDFastError(f"{path}: a ViT of width {width} and depth {depth} with no relative position table "
                              f"does not tell its number of heads; no fdfast preset matches")
        size = "base"
        kwargs.update(embed_dim=int(width), depth=int(depth), num_heads=int(heads))
    if pos_bias != "abs" and "pos_embed" in sd:
        kwargs["use_abs_pos_emb"] = True
    if "blocks.0.gamma_1" not in sd:
        kwargs["init_values"] = None
    if "blocks.0.attn.q_bias" not in sd:
        kwargs["qkv_bias"] = False
    if "head.weight" in sd:  # the fine-tune stage: mean pooling -> fc_norm -> head
        kwargs.update(use_fc_norm="fc_norm.weight" in sd, num_classes=int(sd["head.weight"].shape[0]))
    elif "fc_norm.weight" in sd:
        kwargs["use_fc_norm"] = True
    mlp_hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    if mlp_hidden != 4 * width:
        kwargs["mlp_ratio"] = mlp_hidden / width
    return dict(arch="vit", size=size, patch_size=int(patch), img_size=int(side * patch), drop_path=0.1,
                pos_bias=pos_bias, attention="auto", kwargs=kwargs)
