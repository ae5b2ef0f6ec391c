"""The teacher registry: frozen pre-trained models whose output tokens are FD's targets.

``build_teacher(name, weights=None, img_size=None, **kw)`` returns a ``Teacher``: forward(images [B,3,H,W])
-> tokens [B,N,C] after the teacher's own final norm, BEFORE whitening (fdfast.distill whitens); built with
``embedding=True``, ``Teacher.embedding(images)`` gives its final pooled output (CLIP image embedding after the
projection, or a classifier's logits) for loss.target=embedding. ``name`` is
a registry name (``fdfast teachers`` lists them), ``open_clip:MODEL[:PRETRAINED]`` or any timm model name.

Each registry entry holds, in one place (timm's pretrained-config pattern): the timm architecture and kwargs,
the input size and mean/std (timm's constants), the checkpoint filter that turns the published release
layout into timm's keys, and which tokens are the target. The filters sit here, beside the table, and call
timm's own ``checkpoint_filter_fn`` wherever timm ships the conversion; what they add is FD-specific (which
keys a release carries beside the backbone). The filtered weights load strictly (``convert.load_strict``
lists every mismatched key). Adding a teacher is one row; a plugin adds its own with ``register_teacher``.
``kw`` overrides the timm kwargs (tests build tiny teachers with it).

A timm model folder is a teacher too: ``local-dir:DIR`` or ``hf-hub:ORG/NAME[@REVISION]`` (the same names
``timm.create_model`` takes; hf-hub names come from the Hugging Face cache, so they work offline once
downloaded). Its config.json gives the architecture, the constructor arguments (``model_args``), the input size
and mean / std; the token geometry comes from the built model (``fdfast.models.tokens``); its weights load
strictly through ``filter_timm`` (a classifier head is kept only for loss.target=embedding).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from timm.data import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, IMAGENET_INCEPTION_MEAN,
                       IMAGENET_INCEPTION_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
from timm.layers import DropPath
from timm.models import beit as timm_beit, eva as timm_eva, swin_transformer as timm_swin
from timm.models import swin_transformer_v2 as timm_swinv2, vision_transformer as timm_vit
from torch import nn

from fdfast.errors import FDFastError
from fdfast.models import convert, tokens
from fdfast.models.convert import drop, select_prefix, strip_prefix, unwrap
from fdfast.models.kwargs import check_kwargs

# which tokens are the target: all tokens after the final norm (ViT / Swin / CLIP ln_post), or a CNN's last
# stage map (timm forward_intermediates); fdfast.models.tokens reads both
TOKEN_CHOICES = ("final_norm", "last_stage")


# ---- checkpoint filters: a release's key layout -> timm's (one per published layout) ------------------------

def filter_timm(sd: dict, model: nn.Module) -> dict:
    """A timm state dict of any architecture (the classifier dropped, unless the teacher keeps its head)."""
    sd = strip_prefix(unwrap(sd), "module.")
    classifier = (getattr(model, "pretrained_cfg", None) or {}).get("classifier", "head")
    names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    own = model.state_dict()
    sd = {k: v for k, v in sd.items() if k in own or not any(k == n or k.startswith(n + ".") for n in names)}
    return fit_rel_pos_tables(fit_pos_embed(sd, model), model)


def filter_dino(sd: dict, model: nn.Module) -> dict:
    """DINO (facebookresearch/dino): backbone-only *_pretrain.pth, or a full checkpoint (its teacher's weights)."""
    sd = select_prefix(strip_prefix(unwrap(sd, prefer=("teacher",)), "module."), "backbone.")
    return timm_vit.checkpoint_filter_fn(drop(sd, r"^head\."), model)


def filter_dinov2(sd: dict, model: nn.Module) -> dict:
    """DINOv2 (facebookresearch/dinov2) *_pretrain.pth: timm's conversion (mask token, registers, SwiGLU w12/w3)."""
    sd = dict(select_prefix(strip_prefix(unwrap(sd, prefer=("teacher",)), "module."), "backbone."))
    # called directly: timm's checkpoint_filter_fn only recognises the layout by a mask token, which not
    # every released file (e.g. re-saved backbones) carries
    return timm_vit.checkpoint_filter_fn(timm_vit._convert_dinov2(sd, model), model)


def filter_deit(sd: dict, model: nn.Module) -> dict:
    """DeiT / DeiT III (facebookresearch/deit) {"model": ...}: the distillation head dropped, the classifier too
    unless the model keeps its head (loss.target=embedding); timm maps gamma_N -> lsN.gamma."""
    sd = drop(strip_prefix(unwrap(sd), "module."), *_unless_head(model, r"^head\."), r"^head_dist\.")
    return timm_vit.checkpoint_filter_fn(sd, model, adapt_layer_scale=True)


def filter_mae(sd: dict, model: nn.Module) -> dict:
    """MAE (facebookresearch/mae) {"model": ...}: the encoder; decoder and mask token dropped."""
    sd = drop(strip_prefix(unwrap(sd), "module."), r"^decoder_", r"^mask_token$", r"^head\.")
    return timm_vit.checkpoint_filter_fn(sd, model)


def filter_beit(sd: dict, model: nn.Module) -> dict:
    """BEiT / BEiT v2 (microsoft/unilm) {"model": ...}: MIM head, mask token, BEiT v2's cls_pt_layers dropped;
    timm's filter drops the index buffers and resizes the relative position tables."""
    sd = strip_prefix(unwrap(sd), "module.", "encoder.")
    sd = drop(sd, r"^lm_head\.", r"^mask_token$", r"^cls_pt_layers\.", r"^head\.")
    return timm_beit.checkpoint_filter_fn(sd, model)


def beit_arch(sd: dict) -> dict:
    """BEiT kwargs the weights imply: shared vs per-block relative position bias, absolute position embedding."""
    sd = strip_prefix(unwrap(sd), "module.", "encoder.")
    return dict(use_abs_pos_emb="pos_embed" in sd,
                use_shared_rel_pos_bias="rel_pos_bias.relative_position_bias_table" in sd,
                use_rel_pos_bias="blocks.0.attn.relative_position_bias_table" in sd)


def filter_eva02(sd: dict, model: nn.Module) -> dict:
    """EVA-02 (baaivision/EVA) MIM checkpoints -> timm's filter (SwiGLU, q/v bias, rope buffers).

    The MIM-only keys go first: with a mask token present timm moves ``norm`` to ``fc_norm`` (its fine-tune
    start), while FD's target is the tokens after ``norm``.
    """
    sd = strip_prefix(unwrap(sd, prefer=("model_ema",)), "module.")
    return timm_eva.checkpoint_filter_fn(drop(sd, r"^mask_token$", r"^lm_head\.", r"^head\."), model)


def filter_clip(sd: dict, model: nn.Module) -> dict:
    """CLIP image tower, OpenAI (.pt) or open_clip layout -> timm's OpenAI-CLIP conversion; text tower dropped.

    FD's CLIP target is the tokens after ``ln_post`` (timm's ``norm``), before the projection, so the
    projection (timm's ``head``) is dropped too, unless the model keeps it (loss.target=embedding: the CLIP
    image embedding).
    """
    sd = strip_prefix(unwrap(sd), "module.")
    if not any(k.startswith("visual.") for k in sd):  # the image tower alone
        sd = {f"visual.{k}": v for k, v in sd.items()}
    sd = timm_vit.checkpoint_filter_fn(sd, model)
    return sd if has_head(model) else {k: v for k, v in sd.items() if not k.startswith("head.")}


def filter_swin(sd: dict, model: nn.Module) -> dict:
    """Swin (microsoft/Swin-Transformer) {"model": ...} -> timm's filter (stage layout, index buffers, tables)."""
    return timm_swin.checkpoint_filter_fn(drop(strip_prefix(unwrap(sd), "module."), *_unless_head(model, r"^head\.")),
                                          model)


def filter_esvit(sd: dict, model: nn.Module) -> dict:
    """EsViT (microsoft/esvit): the ``student`` weights under ``module.backbone.``; DINO heads dropped."""
    sd = select_prefix(strip_prefix(unwrap(sd, prefer=("student",)), "module."), "backbone.")
    return timm_swin.checkpoint_filter_fn(drop(sd, r"^head\.", r"^head_dense\."), model)


def filter_swinv2(sd: dict, model: nn.Module) -> dict:
    """SwinV2 (microsoft/Swin-Transformer) {"model": ...} -> timm's filter."""
    sd = drop(strip_prefix(unwrap(sd), "module."), *_unless_head(model, r"^head\."))
    return timm_swinv2.checkpoint_filter_fn(sd, model)


def has_head(model: nn.Module) -> bool:
    """Whether ``model`` was built with its classifier / projection (num_classes > 0: loss.target=embedding)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    return isinstance(head, nn.Module) and any(True for _ in head.parameters())


def _unless_head(model: nn.Module, *patterns: str) -> tuple[str, ...]:
    """The classifier key patterns a filter drops: none when the model keeps its head."""
    return () if has_head(model) else patterns


def fit_pos_embed(sd: dict, model: nn.Module) -> dict:
    """Resample an absolute position embedding to the model's token grid (timm's resample_abs_pos_embed)."""
    from timm.layers import resample_abs_pos_embed
    target = getattr(model, "pos_embed", None)
    if "pos_embed" not in sd or not isinstance(target, torch.Tensor) or sd["pos_embed"].shape == target.shape:
        return sd
    v = sd["pos_embed"]
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    side = int(round((v.shape[1] - prefix) ** 0.5))
    if v.dim() != 3 or side * side != v.shape[1] - prefix or v.shape[-1] != target.shape[-1]:
        return sd  # not a square map of the right width: load_strict reports the mismatch
    return dict(sd, pos_embed=resample_abs_pos_embed(v, new_size=list(model.patch_embed.grid_size),
                                                     old_size=[side, side], num_prefix_tokens=prefix, verbose=False))


def fit_rel_pos_tables(sd: dict, model: nn.Module) -> dict:
    """Resize relative position bias tables (BEiT, Swin) to the model's window (timm's resize_rel_pos_bias_table)."""
    from timm.layers import resize_rel_pos_bias_table
    own = model.state_dict()
    sd = dict(sd)
    for k, v in sd.items():
        if k.endswith("relative_position_bias_table") and k in own and own[k].shape != v.shape \
                and v.shape[-1] == own[k].shape[-1]:
            window = getattr(model.get_submodule(k.rsplit(".", 1)[0]), "window_size", None)
            if window is not None:
                sd[k] = resize_rel_pos_bias_table(v, new_window_size=tuple(window), new_bias_shape=own[k].shape)
    return sd


# ---- the registry ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TeacherEntry:
    """One registry row: everything needed to build a teacher and load its published weights."""
    name: str
    timm_name: str  # the timm architecture
    checkpoint_filter: Callable[[dict, nn.Module], dict] = filter_timm  # release layout -> timm keys
    img_size: int = 224  # pretrained config: the input size ...
    mean: tuple = IMAGENET_DEFAULT_MEAN  # ... and the normalisation the teacher was trained with
    std: tuple = IMAGENET_DEFAULT_STD
    timm_kwargs: dict = field(default_factory=dict)
    tokens: str = "final_norm"  # one of TOKEN_CHOICES
    release_file: str = ""  # the file users pass as --teacher-weights (the family's release)
    pretrained: str | None = None  # timm "arch.tag" whose hub weights (or cache) are the same model
    default_weights: Callable | None = None  # () -> local weights needing no download (a plugin's bundled file)
    kwargs_from_weights: Callable[[dict], dict] | None = None  # timm kwargs a file implies (BEiT's RPB kind)
    # width of the final pooled output loss.target=embedding distills (the CLIP projection, a classifier's
    # logits); None: timm's pretrained config of `pretrained` says (0 there: self-supervised, no head)
    embedding_dim: int | None = None

    @property
    def family(self) -> str:
        """The release layout's name (``fdfast teachers`` shows it): the filter's, or "cnn" for a CNN map."""
        return "cnn" if self.tokens == "last_stage" else self.checkpoint_filter.__name__.removeprefix("filter_")

    @property
    def norm(self) -> tuple:
        return tuple(self.mean), tuple(self.std)

    @property
    def head_dim(self) -> int:
        """Width of the teacher's final pooled output (0: none, so no loss.target=embedding)."""
        if self.embedding_dim is not None:
            return int(self.embedding_dim)
        if not self.pretrained:
            return 0
        from timm.models import get_pretrained_cfg
        cfg = get_pretrained_cfg(self.pretrained)
        return int(getattr(cfg, "num_classes", 0) or 0)

    @property
    def embedding_kind(self) -> str:
        """What loss.target=embedding distills from this teacher: "projection" (CLIP), "logits" or "" (none)."""
        return "" if not self.head_dim else "projection" if self.family == "clip" else "logits"


CLIP = dict(mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
HALF = dict(mean=IMAGENET_INCEPTION_MEAN, std=IMAGENET_INCEPTION_STD)  # BEiT v1: (0.5, 0.5, 0.5)


def _row(name, timm_name, checkpoint_filter, release_file, pretrained=None, *, img_size=224,
         mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD, tokens="final_norm", kwargs_from_weights=None, **kw):
    return TeacherEntry(name, timm_name, checkpoint_filter, img_size, mean, std, kw, tokens, release_file,
                        pretrained, None, kwargs_from_weights)


def _beit(name, timm_name, release_file, **kw):
    return _row(name, timm_name, filter_beit, release_file, kwargs_from_weights=beit_arch, use_fc_norm=False, **kw)


_ENTRIES = [
    # DINO: facebookresearch/dino backbone files (plain state dict, timm ViT layout)
    _row("dino-vit-s16", "vit_small_patch16_224", filter_dino, "dino_deitsmall16_pretrain.pth",
         "vit_small_patch16_224.dino"),
    _row("dino-vit-s8", "vit_small_patch8_224", filter_dino, "dino_deitsmall8_pretrain.pth",
         "vit_small_patch8_224.dino"),
    _row("dino-vit-b16", "vit_base_patch16_224", filter_dino, "dino_vitbase16_pretrain.pth",
         "vit_base_patch16_224.dino"),
    _row("dino-vit-b8", "vit_base_patch8_224", filter_dino, "dino_vitbase8_pretrain.pth", "vit_base_patch8_224.dino"),
    # DINOv2: facebookresearch/dinov2 (pos embed of 518 px resampled to img_size)
    _row("dinov2-vit-s14", "vit_small_patch14_dinov2", filter_dinov2, "dinov2_vits14_pretrain.pth",
         "vit_small_patch14_dinov2.lvd142m"),
    _row("dinov2-vit-b14", "vit_base_patch14_dinov2", filter_dinov2, "dinov2_vitb14_pretrain.pth",
         "vit_base_patch14_dinov2.lvd142m"),
    _row("dinov2-vit-l14", "vit_large_patch14_dinov2", filter_dinov2, "dinov2_vitl14_pretrain.pth",
         "vit_large_patch14_dinov2.lvd142m"),
    _row("dinov2-vit-g14", "vit_giant_patch14_dinov2", filter_dinov2, "dinov2_vitg14_pretrain.pth",
         "vit_giant_patch14_dinov2.lvd142m"),
    _row("dinov2-vit-s14-reg", "vit_small_patch14_reg4_dinov2", filter_dinov2, "dinov2_vits14_reg4_pretrain.pth",
         "vit_small_patch14_reg4_dinov2.lvd142m"),
    _row("dinov2-vit-b14-reg", "vit_base_patch14_reg4_dinov2", filter_dinov2, "dinov2_vitb14_reg4_pretrain.pth",
         "vit_base_patch14_reg4_dinov2.lvd142m"),
    # DeiT / DeiT III: facebookresearch/deit {"model": ...}
    _row("deit-vit-s16", "deit_small_patch16_224", filter_deit, "deit_small_patch16_224-cd65a155.pth",
         "deit_small_patch16_224.fb_in1k"),
    _row("deit-vit-b16", "deit_base_patch16_224", filter_deit, "deit_base_patch16_224-b5f2ef4d.pth",
         "deit_base_patch16_224.fb_in1k"),
    _row("deit3-vit-s16", "deit3_small_patch16_224", filter_deit, "deit_3_small_224_1k.pth",
         "deit3_small_patch16_224.fb_in1k"),
    _row("deit3-vit-b16", "deit3_base_patch16_224", filter_deit, "deit_3_base_224_1k.pth",
         "deit3_base_patch16_224.fb_in1k"),
    _row("deit3-vit-l16", "deit3_large_patch16_224", filter_deit, "deit_3_large_224_1k.pth",
         "deit3_large_patch16_224.fb_in1k"),
    # MAE: facebookresearch/mae pre-trained encoders {"model": ...}
    _row("mae-vit-b16", "vit_base_patch16_224", filter_mae, "mae_pretrain_vit_base.pth", "vit_base_patch16_224.mae"),
    _row("mae-vit-l16", "vit_large_patch16_224", filter_mae, "mae_pretrain_vit_large.pth", "vit_large_patch16_224.mae"),
    _row("mae-vit-h14", "vit_huge_patch14_224", filter_mae, "mae_pretrain_vit_huge.pth", "vit_huge_patch14_224.mae"),
    # BEiT / BEiT v2: microsoft/unilm self-supervised checkpoints (shared or per-block RPB read from the file)
    _beit("beit-vit-b16", "beit_base_patch16_224", "beit_base_patch16_224_pt22k.pth", **HALF),
    _beit("beit-vit-l16", "beit_large_patch16_224", "beit_large_patch16_224_pt22k.pth", **HALF),
    _beit("beitv2-vit-b16", "beitv2_base_patch16_224", "beitv2_base_patch16_224_pt1k.pth"),
    _beit("beitv2-vit-l16", "beitv2_large_patch16_224", "beitv2_large_patch16_224_pt1k.pth"),
    # EVA-02: baaivision/EVA MIM pre-trained (tokens after the final norm, not fc_norm)
    _row("eva02-vit-b14", "eva02_base_patch14_224", filter_eva02, "eva02_B_pt_in21k_p14.pt",
         "eva02_base_patch14_224.mim_in22k", **CLIP, use_fc_norm=False),
    _row("eva02-vit-l14", "eva02_large_patch14_224", filter_eva02, "eva02_L_pt_m38m_p14.pt",
         "eva02_large_patch14_224.mim_m38m", **CLIP, use_fc_norm=False),
    # CLIP: OpenAI .pt (TorchScript) or open_clip files; tokens after ln_post, before proj
    _row("clip-vit-b16", "vit_base_patch16_clip_quickgelu_224", filter_clip, "ViT-B-16.pt",
         "vit_base_patch16_clip_quickgelu_224.openai", **CLIP),
    _row("clip-vit-l14", "vit_large_patch14_clip_quickgelu_224", filter_clip, "ViT-L-14.pt",
         "vit_large_patch14_clip_quickgelu_224.openai", **CLIP),
    _row("clip-vit-l14-336", "vit_large_patch14_clip_quickgelu_336", filter_clip, "ViT-L-14-336px.pt",
         "vit_large_patch14_clip_quickgelu_336.openai", img_size=336, **CLIP),
    _row("openclip-vit-b16-laion2b", "vit_base_patch16_clip_224", filter_clip, "open_clip_pytorch_model.bin",
         "vit_base_patch16_clip_224.laion2b", **CLIP),
    # Swin family: EsViT Swin-B (stage-4 tokens), Swin (v1), SwinV2
    _row("esvit-swin-b-w14", "swin_base_patch4_window7_224", filter_esvit, "checkpoint_best.pth (EsViT Swin-B/W=14)",
         window_size=14),
    _row("esvit-swin-b-w7", "swin_base_patch4_window7_224", filter_esvit, "checkpoint_best.pth (EsViT Swin-B/W=7)"),
    _row("swin-l-w7", "swin_large_patch4_window7_224", filter_swin, "swin_large_patch4_window7_224_22k.pth",
         "swin_large_patch4_window7_224.ms_in22k"),
    _row("swinv2-t-w8", "swinv2_tiny_window8_256", filter_swinv2, "swinv2_tiny_patch4_window8_256.pth",
         "swinv2_tiny_window8_256.ms_in1k", img_size=256),
    _row("swinv2-b-w8", "swinv2_base_window8_256", filter_swinv2, "swinv2_base_patch4_window8_256.pth",
         "swinv2_base_window8_256.ms_in1k", img_size=256),
    # CNNs: the last stage's feature map as tokens
    _row("resnet50", "resnet50", filter_timm, "resnet50 timm state dict", "resnet50.a1_in1k", tokens="last_stage"),
    _row("convnext-b", "convnext_base", filter_timm, "convnext_base timm state dict", "convnext_base.fb_in1k",
         tokens="last_stage"),
]
REGISTRY: dict[str, TeacherEntry] = {e.name: e for e in _ENTRIES}
_PLUGGED: dict[str, TeacherEntry] = {}  # entries registered by plugins (fdfast.plugins), e.g. the demo's


def register_teacher(entry: TeacherEntry) -> None:
    """Add a teacher to the registry (a plugin calls this from its fdfast.plugins entry point)."""
    if not isinstance(entry, TeacherEntry):
        raise FDFastError(f"register_teacher takes a TeacherEntry, got a {type(entry).__name__}")
    if entry.name in REGISTRY:
        raise FDFastError(f"teacher {entry.name!r} is a built-in registry name; register the plugin's teacher "
                          f"under another name")
    if entry.tokens not in TOKEN_CHOICES:
        raise FDFastError(f"teacher {entry.name!r}: tokens must be one of {list(TOKEN_CHOICES)}, got {entry.tokens!r}")
    _PLUGGED[entry.name] = entry  # a plugin loaded again (tests reset plugins) replaces its own rows


def teacher_names() -> list[str]:
    from fdfast.plugins import load_plugins
    load_plugins()
    return sorted(_PLUGGED) + sorted(REGISTRY)


OPEN_CLIP = "open_clip:"  # open_clip:MODEL[:PRETRAINED], e.g. open_clip:ViT-B-16:laion2b_s34b_b88k


def _open_clip_entry(name: str) -> TeacherEntry:
    """An open_clip image tower as the equivalent timm CLIP ViT (tokens after ln_post, before proj)."""
    import open_clip
    model_name, _, tag = name[len(OPEN_CLIP):].partition(":")
    cfg = open_clip.get_model_config(model_name)
    plain = {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio"}
    if cfg is None or set(cfg["vision_cfg"]) - plain:
        extra = sorted(set(cfg["vision_cfg"]) - plain) if cfg else []
        raise FDFastError(f"teacher {name!r}: open_clip model {model_name!r} is "
                          f"{'unknown' if cfg is None else 'not a plain CLIP ViT (it sets ' + ', '.join(extra) + ')'}; "
                          f"plain CLIP ViTs work (e.g. ViT-B-16, ViT-L-14, ViT-L-14-336)")
    v = cfg["vision_cfg"]
    quick = bool(cfg.get("quick_gelu")) or tag == "openai"  # OpenAI's weights were trained with QuickGELU
    kwargs = dict(embed_dim=v["width"], depth=v["layers"], num_heads=v["width"] // v.get("head_width", 64),
                  patch_size=v["patch_size"], mlp_ratio=v.get("mlp_ratio", 4.0))
    arch = "vit_base_patch16_clip_quickgelu_224" if quick else "vit_base_patch16_clip_224"
    return TeacherEntry(name, arch, filter_clip, int(v["image_size"]), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, kwargs,
                        release_file=f"open_clip {model_name} weights (open_clip_model.safetensors, or OpenAI's .pt)",
                        default_weights=(lambda: _open_clip_weights(model_name, tag)) if tag else None,
                        embedding_dim=int(cfg["embed_dim"]))


def _open_clip_weights(model_name: str, tag: str) -> dict:
    """The full CLIP state dict from open_clip's download or cache; offline: say which file to pass."""
    import open_clip
    try:
        return open_clip.create_model(model_name, pretrained=tag, require_pretrained=True).state_dict()
    except Exception as e:
        raise FDFastError(f"teacher {OPEN_CLIP}{model_name}:{tag}: cannot get the open_clip weights "
                          f"({str(e).splitlines()[0][:160]}); pass the weights file with --teacher-weights FILE "
                          f"(open_clip_model.safetensors / open_clip_pytorch_model.bin, or OpenAI's .pt)") from None


TEACHER_SPEC = "teacher:"  # a MODEL argument naming a teacher: teacher:NAME[@WEIGHTS]


def parse_teacher_spec(spec: str) -> tuple[str, str | None]:
    """``teacher:NAME[@WEIGHTS]`` (a MODEL argument of finetune / knn / linprobe / diagnose) -> (NAME, WEIGHTS or
    None); one FDFastError when NAME is empty."""
    name, _, weights = spec[len(TEACHER_SPEC):].partition("@")
    if not name:
        raise FDFastError("teacher:NAME needs a name, e.g. teacher:demo-dinov2-s14 (see `fdfast teachers`)")
    return name, weights or None


def get_entry(name: str) -> TeacherEntry:
    """The registry entry of ``name``; ``open_clip:MODEL[:TAG]``, timm model folders (``local-dir:DIR``,
    ``hf-hub:ORG/NAME``) and any other timm model name get an entry too."""
    from fdfast.plugins import load_plugins, missing_name_error, plugin_failures
    load_plugins()
    if name in _PLUGGED:
        return _PLUGGED[name]
    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith(OPEN_CLIP):
        return _open_clip_entry(name)
    if name.startswith(MODEL_FOLDERS):
        return _folder_entry(name)
    import timm
    arch = name.split(".")[0]
    if not timm.is_model(arch):
        if any(name == p or name.startswith(p + "-") for p in plugin_failures()):
            raise missing_name_error("teacher", name, teacher_names(), "fdfast.models.teachers.register_teacher")
        import difflib
        near = difflib.get_close_matches(name, teacher_names(), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise FDFastError(f"unknown teacher {name!r}{hint}; `fdfast teachers` lists the registry, "
                          f"and any timm model name works too")
    return _timm_entry(name, arch)


def _timm_entry(name: str, arch: str) -> TeacherEntry:
    """A plain timm model name: its pretrained config gives size and mean/std; its module, the layout."""
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(name)
    cfg = cfg.to_dict() if cfg is not None else {}
    checkpoint_filter, tokens_choice = _layout_of(arch)
    return TeacherEntry(name, arch, checkpoint_filter, int(cfg.get("input_size", (3, 224, 224))[-1]),
                        tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN)), tuple(cfg.get("std", IMAGENET_DEFAULT_STD)),
                        tokens=tokens_choice, release_file=f"a {arch} timm state dict",
                        pretrained=name if "." in name or cfg.get("hf_hub_id") or cfg.get("url") else None)


def _layout_of(arch: str) -> tuple[Callable, str]:
    """(checkpoint filter, token choice) of a timm architecture, from the module that defines it."""
    from timm.models import is_model_in_modules
    vit_like = is_model_in_modules(arch, ["vision_transformer", "deit", "beit", "eva", "vision_transformer_relpos",
                                          "vision_transformer_sam"])
    filters = {"swin_transformer": filter_swin, "swin_transformer_v2": filter_swinv2}
    checkpoint_filter = next((f for module, f in filters.items() if is_model_in_modules(arch, [module])), filter_timm)
    return checkpoint_filter, "final_norm" if vit_like or checkpoint_filter is not filter_timm else "last_stage"


# ---- timm model folders: local-dir:DIR, hf-hub:ORG/NAME ------------------------------------------------------

MODEL_FOLDERS = ("local-dir:", "hf-hub:")  # timm.create_model's prefixes for a model folder
FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")  # timm's preference


def model_folder(name: str) -> Path:
    """The local folder (config.json + weights) of ``local-dir:DIR`` or ``hf-hub:ORG/NAME[@REVISION]``.

    hf-hub names resolve through huggingface_hub: from its cache when offline (HF_HUB_OFFLINE=1), downloaded
    otherwise; a name that is not cached offline is one FDFastError saying so.
    """
    source, _, ident = name.partition(":")
    if source == "local-dir":
        folder = Path(ident).expanduser()
        if not (folder / "config.json").is_file():
            raise FDFastError(f"{name}: {str(folder)!r} holds no config.json; a timm model folder holds config.json "
                              f"and model.safetensors (`fdfast export RUN --to timm-dir --out DIR` writes one)")
        return folder
    repo, _, revision = ident.partition("@")
    if not repo:
        raise FDFastError(f"{name}: name the Hugging Face repo, e.g. hf-hub:timm/vit_small_patch16_224.dino")
    config = _hub_file(name, repo, "config.json", revision or None)
    for weights in FOLDER_WEIGHTS:  # the snapshot folder holds every file of one revision
        try:
            _hub_file(name, repo, weights, revision or None)
            return Path(config).parent
        except FileNotFoundError:
            continue
    raise FDFastError(f"{name}: its config.json is there but no weights file ({', '.join(FOLDER_WEIGHTS)})"
                      + (" in the Hugging Face cache (HF_HUB_OFFLINE=1)" if _offline() else ""))


def _hub_file(name: str, repo: str, filename: str, revision: str | None) -> str:
    """A file of a hub repo (cache first); FileNotFoundError for a weights file the repo / cache lacks."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError
    try:
        return hf_hub_download(repo, filename, revision=revision)
    except EntryNotFoundError:
        if filename != "config.json":
            raise FileNotFoundError(filename) from None
        why = ("not in the Hugging Face cache " + repr(str(constants.HF_HUB_CACHE)) if _offline()
               else "the repo has no config.json (not a timm model folder)")
    except Exception as e:  # network / repo / revision errors: huggingface_hub has many types
        why = str(e).strip().splitlines()[0][:200]
    offline = " with HF_HUB_OFFLINE=1: download it once online, or pass local-dir:DIR" if _offline() else ""
    raise FDFastError(f"{name}: cannot get {filename} ({why}){offline}")


def _offline() -> bool:
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def read_model_folder(folder: Path) -> tuple[str, dict, dict]:
    """(architecture, model_args, pretrained_cfg) of a timm model folder's config.json (timm's format; the older
    single-dict layout too)."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
        if "pretrained_cfg" in cfg:
            arch, pretrained_cfg = cfg["architecture"], dict(cfg["pretrained_cfg"])
        else:  # timm < 0.8 exports: one dict
            pretrained_cfg = dict(cfg)
            arch = pretrained_cfg.pop("architecture")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FDFastError(f"{folder / 'config.json'} is not a timm model config ({type(e).__name__}: {e}); "
                          f"it needs 'architecture' and 'pretrained_cfg'") from None
    if "num_classes" in cfg:
        pretrained_cfg["num_classes"] = cfg["num_classes"]
    return arch, dict(cfg.get("model_args") or {}), pretrained_cfg


def folder_weights(folder: Path) -> Path:
    found = next((folder / n for n in FOLDER_WEIGHTS if (folder / n).is_file()), None)
    if found is None:
        raise FDFastError(f"{folder} holds no weights file ({', '.join(FOLDER_WEIGHTS)}); a timm model folder "
                          f"holds config.json and model.safetensors")
    return found


def _folder_entry(name: str) -> TeacherEntry:
    """A registry row for a timm model folder: architecture, arguments, input size and mean / std from its config."""
    import timm
    folder = model_folder(name)
    arch, model_args, pretrained_cfg = read_model_folder(folder)
    if not timm.is_model(arch):
        raise FDFastError(f"{name}: its architecture {arch!r} is not a timm model here; upgrade timm "
                          f"(pip install -U timm) or pick another folder")
    weights = folder_weights(folder)
    checkpoint_filter, tokens_choice = _layout_of(arch)
    # img_size and num_classes are the teacher's own choices (input size, head for loss.target=embedding)
    kwargs = {k: v for k, v in model_args.items() if k not in ("img_size", "num_classes")}
    return TeacherEntry(name, arch, checkpoint_filter, int(pretrained_cfg.get("input_size", (3, 224, 224))[-1]),
                        tuple(pretrained_cfg.get("mean", IMAGENET_DEFAULT_MEAN)),
                        tuple(pretrained_cfg.get("std", IMAGENET_DEFAULT_STD)), kwargs, tokens_choice,
                        release_file=f"{weights.name} of {name}",
                        default_weights=lambda: convert.read_weights(weights),
                        embedding_dim=int(pretrained_cfg.get("num_classes") or 0))


# ---- the teacher -------------------------------------------------------------------------------------------

class Teacher(nn.Module):
    """A frozen teacher: forward(images [B,3,H,W]) -> tokens [B,N,C] after its final norm, before whitening.

    Attributes: ``dim`` (C), ``grid`` (h, w) of the patch tokens, ``num_prefix_tokens`` (CLS [+ registers],
    first in N), ``mean`` / ``std`` (the normalisation its inputs need), ``img_size`` (images of another size
    are resized to it, bilinear with antialiasing), ``embedding_dim``: width of ``embedding(images)``, the
    final pooled output (0: built without its head), ``drop_path``: > 0 keeps its DropPath layers active in
    train mode (the paper's ablation of its asymmetric drop path; norms and dropout stay in eval).
    """

    def __init__(self, backbone: nn.Module, entry: TeacherEntry, img_size: int, drop_path: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.name, self.family = entry.name, entry.family
        self.mean, self.std = tuple(entry.mean), tuple(entry.std)
        self.img_size = int(img_size)
        self.drop_path = float(drop_path)
        self.embedding_dim = int(getattr(backbone, "num_classes", 0) or 0) if has_head(backbone) else 0
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()
        geom = tokens.geometry(backbone, (self.img_size, self.img_size))
        self.layout, self.grid, self.num_prefix_tokens, self.dim = geom.layout, geom.grid, geom.num_prefix_tokens, \
            geom.dim

    def train(self, mode: bool = True):
        """Frozen in eval mode (norm statistics, dropout); only with drop_path > 0 do its DropPath layers follow
        ``mode``. It never gets a gradient either way."""
        super().train(False)
        if mode and self.drop_path > 0:
            for m in self.modules():
                if isinstance(m, DropPath):
                    m.train(True)
        return self

    def _at_own_size(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[-2:]) != (self.img_size, self.img_size):
            # a teacher sees its own input size (FD feeds CLIP L/14 224 px while the student sees 256 px)
            images = F.interpolate(images, size=(self.img_size, self.img_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        return images

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return tokens.final_tokens(self.backbone, self._at_own_size(images))  # [B, N, C]

    @torch.no_grad()
    def embedding(self, images: torch.Tensor) -> torch.Tensor:
        """The final pooled output [B, embedding_dim]: the CLIP image embedding after its projection, or logits."""
        if not self.embedding_dim:
            raise FDFastError(embedding_error(self.name))
        return self.backbone(self._at_own_size(images))

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, grid={self.grid}, prefix={self.num_prefix_tokens}, dim={self.dim}, "
                f"embedding_dim={self.embedding_dim}, drop_path={self.drop_path}")


def embedding_teachers() -> list[str]:
    """Registry teachers with a final pooled output (CLIP projection / classifier logits) for loss.target=embedding."""
    return [n for n in teacher_names() if get_entry(n).head_dim]


def embedding_error(name: str) -> str:
    return (f"teacher {name!r} has no final pooled output (no CLIP projection, no classifier head), so "
            f"loss.target=embedding has nothing to distill; use loss.target=cls or tokens, or a teacher that has "
            f"one: {', '.join(embedding_teachers())} (or a timm classifier name)")


def _create(entry: TeacherEntry, img_size: int, pretrained: bool, kw: dict) -> nn.Module:
    import timm
    kwargs = dict(entry.timm_kwargs)
    if entry.tokens != "last_stage":
        kwargs["img_size"] = img_size  # the weights' own size is resampled to it
    kwargs.update(kw)
    kwargs.setdefault("num_classes", 0)
    arch = entry.pretrained if pretrained else entry.timm_name
    try:
        model = timm.create_model(arch, pretrained=pretrained, **kwargs)
    except TypeError as e:
        raise FDFastError(f"teacher {entry.name!r}: timm {entry.timm_name} rejects the kwargs {kwargs}: {e}") from None
    check_kwargs(type(model), kw, "teacher.kwargs")  # timm's factories drop unknown kwargs without a word
    return model


def build_teacher(name: str, weights=None, img_size: int | None = None, *, embedding: bool = False,
                  drop_path: float = 0.0, **kw) -> Teacher:
    """A frozen teacher by registry, open_clip or timm name.

    weights: a local file in the family's published layout (or timm's), or such a state dict; None: the
    entry's default source (a plugin's bundled file, timm's or open_clip's hub cache); "random": random
    init (tests, smoke runs).
    img_size: input size (default: the entry's); absolute position embeddings are resampled to it.
    embedding: keep the head (CLIP projection / classifier), so ``Teacher.embedding`` works (loss.target=embedding).
    drop_path: the teacher's drop path rate (timm's drop_path_rate); active in train mode only (see Teacher).
    kw: timm kwargs overriding the entry's.
    """
    entry = get_entry(name)
    img_size = int(img_size or entry.img_size)
    if embedding and not entry.head_dim:
        raise FDFastError(embedding_error(entry.name))
    if drop_path and "drop_path_rate" in kw:
        raise FDFastError(f"teacher {entry.name!r}: set the drop path once, teacher.drop_path={drop_path} or "
                          f"teacher.kwargs drop_path_rate={kw['drop_path_rate']}, not both")
    kw = dict({"num_classes": entry.head_dim} if embedding else {}, **kw)  # teacher.kwargs num_classes wins
    if drop_path:
        kw["drop_path_rate"] = float(drop_path)
    if weights is None and entry.default_weights is not None:
        weights = entry.default_weights()
    if weights is None:
        model = _from_hub(entry, img_size, kw)
    elif isinstance(weights, str) and weights == "random":
        model = _create(entry, img_size, False, kw)
    else:
        raw = weights if isinstance(weights, dict) else convert.read_weights(weights)
        source = "the given state dict" if isinstance(weights, dict) else repr(str(weights))
        implied = entry.kwargs_from_weights(raw) if entry.kwargs_from_weights else {}
        model = _create(entry, img_size, False, dict(implied, **kw))
        fix = (f"Pass the {entry.name} weights ({entry.release_file or entry.timm_name}) as --teacher-weights, "
               f"or a teacher name whose architecture matches the file")
        convert.load_strict(model, entry.checkpoint_filter(raw, model),
                            f"weights {source} for teacher {entry.name!r}", fix)
    if (tokens.layout(model) == "cnn") != (entry.tokens == "last_stage"):
        raise FDFastError(f"teacher {entry.name!r}: tokens {entry.tokens!r} do not fit timm {entry.timm_name} "
                          f"(a {tokens.layout(model)} layout); use 'last_stage' for CNNs, 'final_norm' otherwise")
    if drop_path and not any(isinstance(m, DropPath) for m in model.modules()):
        raise FDFastError(f"teacher {entry.name!r}: timm {entry.timm_name} has no drop path layers, so "
                          f"teacher.drop_path={drop_path} would change nothing; set teacher.drop_path=0")
    return Teacher(model if embedding else tokens.prune_to_final_tokens(model), entry, img_size, drop_path)


def _from_hub(entry: TeacherEntry, img_size: int, kw: dict) -> nn.Module:
    """timm's pretrained weights (its hub cache); offline without a cache: say which file to pass."""
    fix = (f"pass the weights file with --teacher-weights FILE (teacher.weights): "
           f"{entry.release_file or 'a ' + entry.timm_name + ' timm state dict'}")
    if not entry.pretrained:
        raise FDFastError(f"teacher {entry.name!r} has no downloadable weights here; {fix}")
    try:
        return _create(entry, img_size, True, kw)
    except FDFastError:
        raise
    except Exception as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
        why = "offline (HF_HUB_OFFLINE=1) and not in the hub cache" if offline else str(e).splitlines()[0][:200]
        raise FDFastError(f"teacher {entry.name!r}: cannot get timm weights {entry.pretrained} ({why}); {fix}") from None


# ---- `fdfast teachers` ------------------------------------------------------------------------------------

def registry_rows() -> list[dict]:
    """One row per registry teacher: geometry computed from the timm architecture on the meta device."""
    rows = []
    for name in teacher_names():
        e = get_entry(name)
        rows.append(dict(name=name, family=e.family, timm=e.timm_name, input=e.img_size,
                         mean=e.mean, std=e.std, **_meta_geometry(e), weights=e.release_file,
                         embedding=f"{e.embedding_kind}:{e.head_dim}" if e.head_dim else "-"))
    return rows


def _meta_geometry(e: TeacherEntry) -> dict:
    try:
        with torch.device("meta"):
            geom = tokens.geometry(_create(e, e.img_size, False, {}), (e.img_size, e.img_size))
        return dict(grid=f"{geom.grid[0]}x{geom.grid[1]}", prefix=geom.num_prefix_tokens, width=geom.dim)
    except Exception as ex:  # a row that cannot be built still prints
        return dict(grid="?", prefix="?", width=f"? ({type(ex).__name__})")


def _fmt(t) -> str:
    return "(" + ",".join(f"{x:.3f}" for x in t) + ")"


def print_registry(rows=None) -> None:
    rows = rows if rows is not None else registry_rows()
    head = ["name", "family", "input", "mean", "std", "grid", "prefix", "width", "embedding", "timm architecture"]
    table = [[r["name"], r["family"], str(r["input"]), _fmt(r["mean"]), _fmt(r["std"]), r["grid"],
              str(r["prefix"]), str(r["width"]), r["embedding"], r["timm"]] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(head)]
    for line in [head] + table:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
    print("\nAny timm model name works too, and any timm model folder: local-dir:DIR, hf-hub:ORG/NAME (its config "
          "and weights). Weights: --teacher-weights FILE (the family's release file), or timm's hub cache when "
          "online. embedding: the final pooled output loss.target=embedding distills.")


def register(subparsers) -> None:
    p = subparsers.add_parser("teachers", help="list the teacher registry (input size, mean/std, grid, width)")
    p.set_defaults(func=lambda args: print_registry() or 0)
