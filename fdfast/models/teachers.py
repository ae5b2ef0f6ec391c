"""The teacher registry: frozen pre-trained models whose output tokens are FD's targets.

``build_teacher(name, weights=None, img_size=None, **kw)`` returns a ``Teacher``: forward(images [B,3,H,W])
-> tokens [B,N,C] after the teacher's own final norm, BEFORE whitening (fdfast.distill whitens). ``name`` is
a registry name (``fdfast teachers`` lists them), ``open_clip:MODEL[:PRETRAINED]`` or any timm model name.
Every family is a timm architecture; a per-family key filter (fdfast.models.convert) turns the published
checkpoint layout into timm's and the weights are loaded strictly. ``kw`` overrides the timm kwargs (tests
build tiny teachers with it).
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fdfast.errors import FDFastError
from fdfast.models.kwargs import check_kwargs
from fdfast.models import convert

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


@dataclass(frozen=True)
class TeacherEntry:
    """One registry row: the timm architecture, its input normalisation and where its weights come from."""
    name: str
    family: str  # key of convert.FILTERS: the published layout of the weights
    timm_name: str
    img_size: int = 224
    norm: tuple = IMAGENET  # (mean, std) the teacher was trained with
    release_file: str = ""  # the file users pass as --teacher-weights (the family's release)
    pretrained: str | None = None  # timm "arch.tag" whose hub weights (or cache) are the same model
    timm_kwargs: dict = field(default_factory=dict)
    default_weights: Callable | None = None  # local weights that need no download (the demo teachers)


def _demo(attr: str):
    """fdfast.demo.<attr>, imported only when used (the demo module ships the package-bundled weights)."""
    def get():
        try:
            module = importlib.import_module("fdfast.demo")
        except ModuleNotFoundError as e:
            raise FDFastError(f"the demo teachers need fdfast.demo, which is not importable ({e})") from None
        return getattr(module, attr)
    return get


def _vit(name, family, timm_name, release_file, pretrained=None, norm=IMAGENET, img_size=224, **kw):
    return TeacherEntry(name, family, timm_name, img_size, norm, release_file, pretrained, kw)


_ENTRIES = [
    # DINO: facebookresearch/dino backbone files (plain state dict, timm ViT layout)
    _vit("dino-vit-s16", "dino", "vit_small_patch16_224", "dino_deitsmall16_pretrain.pth", "vit_small_patch16_224.dino"),
    _vit("dino-vit-s8", "dino", "vit_small_patch8_224", "dino_deitsmall8_pretrain.pth", "vit_small_patch8_224.dino"),
    _vit("dino-vit-b16", "dino", "vit_base_patch16_224", "dino_vitbase16_pretrain.pth", "vit_base_patch16_224.dino"),
    _vit("dino-vit-b8", "dino", "vit_base_patch8_224", "dino_vitbase8_pretrain.pth", "vit_base_patch8_224.dino"),
    # DINOv2: facebookresearch/dinov2 (pos embed of 518 px resampled to img_size)
    _vit("dinov2-vit-s14", "dinov2", "vit_small_patch14_dinov2", "dinov2_vits14_pretrain.pth",
         "vit_small_patch14_dinov2.lvd142m"),
    _vit("dinov2-vit-b14", "dinov2", "vit_base_patch14_dinov2", "dinov2_vitb14_pretrain.pth",
         "vit_base_patch14_dinov2.lvd142m"),
    _vit("dinov2-vit-l14", "dinov2", "vit_large_patch14_dinov2", "dinov2_vitl14_pretrain.pth",
         "vit_large_patch14_dinov2.lvd142m"),
    _vit("dinov2-vit-g14", "dinov2", "vit_giant_patch14_dinov2", "dinov2_vitg14_pretrain.pth",
         "vit_giant_patch14_dinov2.lvd142m"),
    _vit("dinov2-vit-s14-reg", "dinov2", "vit_small_patch14_reg4_dinov2", "dinov2_vits14_reg4_pretrain.pth",
         "vit_small_patch14_reg4_dinov2.lvd142m"),
    _vit("dinov2-vit-b14-reg", "dinov2", "vit_base_patch14_reg4_dinov2", "dinov2_vitb14_reg4_pretrain.pth",
         "vit_base_patch14_reg4_dinov2.lvd142m"),
    # DeiT / DeiT III: facebookresearch/deit {"model": ...}
    _vit("deit-vit-s16", "deit", "deit_small_patch16_224", "deit_small_patch16_224-cd65a155.pth", "deit_small_patch16_224.fb_in1k"),
    _vit("deit-vit-b16", "deit", "deit_base_patch16_224", "deit_base_patch16_224-b5f2ef4d.pth", "deit_base_patch16_224.fb_in1k"),
    _vit("deit3-vit-s16", "deit", "deit3_small_patch16_224", "deit_3_small_224_1k.pth", "deit3_small_patch16_224.fb_in1k"),
    _vit("deit3-vit-b16", "deit", "deit3_base_patch16_224", "deit_3_base_224_1k.pth", "deit3_base_patch16_224.fb_in1k"),
    _vit("deit3-vit-l16", "deit", "deit3_large_patch16_224", "deit_3_large_224_1k.pth", "deit3_large_patch16_224.fb_in1k"),
    # MAE: facebookresearch/mae pre-trained encoders {"model": ...}
    _vit("mae-vit-b16", "mae", "vit_base_patch16_224", "mae_pretrain_vit_base.pth", "vit_base_patch16_224.mae"),
    _vit("mae-vit-l16", "mae", "vit_large_patch16_224", "mae_pretrain_vit_large.pth", "vit_large_patch16_224.mae"),
    _vit("mae-vit-h14", "mae", "vit_huge_patch14_224", "mae_pretrain_vit_huge.pth", "vit_huge_patch14_224.mae"),
    # BEiT / BEiT v2: microsoft/unilm self-supervised checkpoints (shared or per-block RPB read from the file)
    _vit("beit-vit-b16", "beit", "beit_base_patch16_224", "beit_base_patch16_224_pt22k.pth", None, HALF,
         use_fc_norm=False),
    _vit("beit-vit-l16", "beit", "beit_large_patch16_224", "beit_large_patch16_224_pt22k.pth", None, HALF,
         use_fc_norm=False),
    _vit("beitv2-vit-b16", "beit", "beitv2_base_patch16_224", "beitv2_base_patch16_224_pt1k.pth", use_fc_norm=False),
    _vit("beitv2-vit-l16", "beit", "beitv2_large_patch16_224", "beitv2_large_patch16_224_pt1k.pth", use_fc_norm=False),
    # EVA-02: baaivision/EVA MIM pre-trained (tokens after the final norm, not fc_norm)
    _vit("eva02-vit-b14", "eva02", "eva02_base_patch14_224", "eva02_B_pt_in21k_p14.pt",
         "eva02_base_patch14_224.mim_in22k", CLIP, use_fc_norm=False),
    _vit("eva02-vit-l14", "eva02", "eva02_large_patch14_224", "eva02_L_pt_m38m_p14.pt",
         "eva02_large_patch14_224.mim_m38m", CLIP, use_fc_norm=False),
    # CLIP: OpenAI .pt (TorchScript) or open_clip files; tokens after ln_post, before proj
    _vit("clip-vit-b16", "clip", "vit_base_patch16_clip_quickgelu_224", "ViT-B-16.pt",
         "vit_base_patch16_clip_quickgelu_224.openai", CLIP),
    _vit("clip-vit-l14", "clip", "vit_large_patch14_clip_quickgelu_224", "ViT-L-14.pt",
         "vit_large_patch14_clip_quickgelu_224.openai", CLIP),
    _vit("clip-vit-l14-336", "clip", "vit_large_patch14_clip_quickgelu_336", "ViT-L-14-336px.pt",
         "vit_large_patch14_clip_quickgelu_336.openai", CLIP, img_size=336),
    _vit("openclip-vit-b16-laion2b", "clip", "vit_base_patch16_clip_224", "open_clip_pytorch_model.bin",
         "vit_base_patch16_clip_224.laion2b", CLIP),
    # Swin family: EsViT Swin-B (stage-4 tokens), Swin (v1), SwinV2
    _vit("esvit-swin-b-w14", "esvit", "swin_base_patch4_window7_224", "checkpoint_best.pth (EsViT Swin-B/W=14)",
         None, window_size=14),
    _vit("esvit-swin-b-w7", "esvit", "swin_base_patch4_window7_224", "checkpoint_best.pth (EsViT Swin-B/W=7)"),
    _vit("swin-l-w7", "swin", "swin_large_patch4_window7_224", "swin_large_patch4_window7_224_22k.pth",
         "swin_large_patch4_window7_224.ms_in22k"),
    _vit("swinv2-t-w8", "swinv2", "swinv2_tiny_window8_256", "swinv2_tiny_patch4_window8_256.pth",
         "swinv2_tiny_window8_256.ms_in1k", img_size=256),
    _vit("swinv2-b-w8", "swinv2", "swinv2_base_window8_256", "swinv2_base_patch4_window8_256.pth",
         "swinv2_base_window8_256.ms_in1k", img_size=256),
    # CNNs: the final feature map (timm features_only) as tokens
    _vit("resnet50", "cnn", "resnet50", "resnet50 timm state dict", "resnet50.a1_in1k"),
    _vit("convnext-b", "cnn", "convnext_base", "convnext_base timm state dict", "convnext_base.fb_in1k"),
]
REGISTRY: dict[str, TeacherEntry] = {e.name: e for e in _ENTRIES}


def _demo_entry(name, const, weights_fn, family, default_timm, mean_std=("DEMO_MEAN", "DEMO_STD")):
    """A teacher whose timm name/kwargs, mean/std and weights come from fdfast.demo (package-bundled weights)."""
    def resolve() -> TeacherEntry:
        try:
            timm_name, timm_kwargs = _demo(const)()
            norm = (tuple(_demo(mean_std[0])()), tuple(_demo(mean_std[1])()))
        except (FDFastError, AttributeError):  # table rows still print before fdfast.demo exists
            timm_name, timm_kwargs, norm = default_timm, {}, IMAGENET
        return TeacherEntry(name, family, timm_name, 224, norm, f"fdfast.demo.{weights_fn}()",
                            None, dict(timm_kwargs), lambda: _demo(weights_fn)()())
    return resolve


DEMO_TEACHERS = {
    "demo-dinov2-s14": _demo_entry("demo-dinov2-s14", "DINOV2_S14_TIMM", "dinov2_s14_weights", "timm",
                                   "vit_small_patch14_dinov2"),
    "demo-efficientnet-lite0": _demo_entry("demo-efficientnet-lite0", "EFFICIENTNET_LITE0_TIMM",
                                           "efficientnet_lite0_weights", "cnn", "efficientnet_lite0",
                                           ("EFFICIENTNET_LITE0_MEAN", "EFFICIENTNET_LITE0_STD")),
}


def teacher_names() -> list[str]:
    return sorted(DEMO_TEACHERS) + sorted(REGISTRY)


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
    hub = (lambda: _open_clip_weights(model_name, tag)) if tag else None
    return TeacherEntry(name, "clip", arch, int(v["image_size"]), CLIP,
                        f"open_clip {model_name} weights (open_clip_model.safetensors, or OpenAI's .pt)", None,
                        kwargs, hub)


def _open_clip_weights(model_name: str, tag: str) -> dict:
    """The full CLIP state dict from open_clip's download or cache; offline: say which file to pass."""
    import open_clip
    try:
        return open_clip.create_model(model_name, pretrained=tag, require_pretrained=True).state_dict()
    except Exception as e:
        raise FDFastError(f"teacher {OPEN_CLIP}{model_name}:{tag}: cannot get the open_clip weights "
                          f"({str(e).splitlines()[0][:160]}); pass the weights file with --teacher-weights FILE "
                          f"(open_clip_model.safetensors / open_clip_pytorch_model.bin, or OpenAI's .pt)") from None


def get_entry(name: str) -> TeacherEntry:
    """The registry entry of ``name``; ``open_clip:MODEL[:TAG]`` and any other timm model name get an entry too."""
    if name in DEMO_TEACHERS:
        return DEMO_TEACHERS[name]()
    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith(OPEN_CLIP):
        return _open_clip_entry(name)
    import timm
    arch = name.split(".")[0]
    if not timm.is_model(arch):
        import difflib
        near = difflib.get_close_matches(name, teacher_names(), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise FDFastError(f"unknown teacher {name!r}{hint}; `fdfast teachers` lists the registry, "
                          f"and any timm model name works too")
    from timm.models import get_pretrained_cfg
    cfg = get_pretrained_cfg(name)
    cfg = cfg.to_dict() if cfg is not None else {}
    norm = (tuple(cfg.get("mean", IMAGENET[0])), tuple(cfg.get("std", IMAGENET[1])))
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    return TeacherEntry(name, _timm_family(arch), arch, size, norm, f"a {arch} timm state dict",
                        name if "." in name or cfg.get("hf_hub_id") or cfg.get("url") else None)


def _timm_family(arch: str) -> str:
    """How tokens are read from a timm architecture: ViT-like [B,N,C], Swin-like NHWC, or a CNN map."""
    from timm.models import is_model_in_modules
    if is_model_in_modules(arch, ["swin_transformer", "swin_transformer_v2", "swin_transformer_v2_cr"]):
        return "swin"
    if is_model_in_modules(arch, ["vision_transformer", "deit", "beit", "eva", "vision_transformer_relpos",
                                  "vision_transformer_sam"]):
        return "timm"
    return "cnn"


class Teacher(nn.Module):
    """A frozen teacher: forward(images [B,3,H,W]) -> tokens [B,N,C] after its final norm, before whitening.

    Attributes: ``dim`` (C), ``grid`` (h, w) of the patch tokens, ``num_prefix_tokens`` (CLS [+ registers],
    first in N), ``mean`` / ``std`` (the normalisation its inputs need), ``img_size`` (images of another size
    are resized to it, bilinear with antialiasing).
    """

    def __init__(self, backbone: nn.Module, tokens: str, entry: TeacherEntry, img_size: int):
        super().__init__()
        self.backbone = backbone
        self.tokens = tokens  # "vit" [B,N,C] | "nhwc" [B,H,W,C] | "cnn" list of [B,C,H,W]
        self.name, self.family = entry.name, entry.family
        self.mean, self.std = tuple(entry.norm[0]), tuple(entry.norm[1])
        self.img_size = int(img_size)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()
        self.grid, self.num_prefix_tokens, self.dim = self._geometry()

    def train(self, mode: bool = True):
        return super().train(False)  # the teacher is frozen in eval mode (no dropout, no drop path)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[-2:]) != (self.img_size, self.img_size):
            # a teacher sees its own input size (FD feeds CLIP L/14 224 px while the student sees 256 px)
            images = F.interpolate(images, size=(self.img_size, self.img_size), mode="bilinear",
                                   align_corners=False, antialias=True)
        if self.tokens == "cnn":
            x = self.backbone(images)[-1]  # [B, C, H, W]
            return x.flatten(2).transpose(1, 2)
        x = self.backbone.forward_features(images)
        return x.flatten(1, 2) if self.tokens == "nhwc" else x  # [B, N, C]

    def _geometry(self):
        """(grid (h, w), prefix tokens, width) of the output at img_size, from the architecture."""
        m = self.backbone
        if self.tokens == "vit":
            return tuple(int(s) for s in m.patch_embed.grid_size), int(getattr(m, "num_prefix_tokens", 1)), \
                int(m.num_features)
        if self.tokens == "nhwc":
            reduction = int(m.feature_info[-1]["reduction"])
            return (self.img_size // reduction,) * 2, 0, int(m.num_features)
        device = next(self.backbone.parameters()).device
        out = self.forward(torch.zeros(1, 3, self.img_size, self.img_size, device=device))
        reduction = int(m.feature_info.reduction()[-1])
        h = w = -(-self.img_size // reduction)
        if h * w != out.shape[1]:
            h = w = int(round(out.shape[1] ** 0.5))
        return (h, w), 0, int(out.shape[-1])

    def extra_repr(self) -> str:
        return f"name={self.name!r}, grid={self.grid}, prefix={self.num_prefix_tokens}, dim={self.dim}"


def _create(entry: TeacherEntry, img_size: int, pretrained: bool, kw: dict) -> nn.Module:
    import timm
    kwargs = dict(entry.timm_kwargs)
    if entry.family != "cnn":
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


def build_teacher(name: str, weights=None, img_size: int | None = None, **kw) -> Teacher:
    """A frozen teacher by registry, open_clip or timm name.

    weights: a local file in the family's published layout (or timm's), or such a state dict; None: the
    entry's default source (the demo's bundled file, timm's or open_clip's hub cache); "random": random
    init (tests, smoke runs).
    img_size: input size (default: the entry's); absolute position embeddings are resampled to it.
    kw: timm kwargs overriding the entry's.
    """
    entry = get_entry(name)
    img_size = int(img_size or entry.img_size)
    if weights is None and entry.default_weights is not None:
        weights = entry.default_weights()
    tokens = {"swin": "nhwc", "esvit": "nhwc", "swinv2": "nhwc", "cnn": "cnn"}.get(entry.family, "vit")
    if weights is None:
        model = _from_hub(entry, img_size, kw)
    elif isinstance(weights, str) and weights == "random":
        model = _create(entry, img_size, False, kw)
    else:
        raw = weights if isinstance(weights, dict) else convert.read_weights(weights)
        source = "the given state dict" if isinstance(weights, dict) else repr(str(weights))
        arch = convert.beit_arch(raw) if entry.family == "beit" else {}  # shared or per-block RPB, as in the file
        model = _create(entry, img_size, False, dict(arch, **kw))
        fix = (f"Pass the {entry.name} weights ({entry.release_file or entry.timm_name}) as --teacher-weights, "
               f"or a teacher name whose architecture matches the file")
        convert.load_strict(model, convert.FILTERS[entry.family](raw, model),
                            f"weights {source} for teacher {entry.name!r}", fix)
    if tokens == "cnn":
        model = _final_map_extractor(entry, model, kw)
    return Teacher(model, tokens, entry, img_size)


def _final_map_extractor(entry: TeacherEntry, full: nn.Module, kw: dict) -> nn.Module:
    """timm's features_only model (last stage) carrying the weights already loaded strictly into ``full``.

    timm's feature wrappers may rename modules (flatten_sequential joins ``stem.0`` into ``stem_0``); each key
    of the wrapper is looked up under both names and all of them must be found.
    """
    import timm
    kwargs = {k: v for k, v in dict(entry.timm_kwargs, **kw).items() if k != "num_classes"}
    features = timm.create_model(entry.timm_name, features_only=True, out_indices=(-1,), **kwargs)
    weights, loaded = {}, full.state_dict()
    for k in features.state_dict():
        head, _, rest = k.partition(".")
        for cand in (k, head.replace("_", ".", 1) + "." + rest):
            if cand in loaded:
                weights[k] = loaded[cand]
                break
        else:
            raise FDFastError(f"teacher {entry.name!r}: timm's features_only {entry.timm_name} has a parameter {k!r} "
                              f"that the full model lacks; use a teacher name whose timm model supports features_only")
    features.load_state_dict(weights, strict=True)
    return features


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
                         mean=e.norm[0], std=e.norm[1], **_meta_geometry(e), weights=e.release_file))
    return rows


def _meta_geometry(e: TeacherEntry) -> dict:
    try:
        import timm
        kwargs = dict(e.timm_kwargs, num_classes=0)
        if e.family != "cnn":
            kwargs["img_size"] = e.img_size
        with torch.device("meta"):
            m = timm.create_model(e.timm_name, **kwargs)
        if e.family == "cnn":
            info = m.feature_info[-1]
            g = -(-e.img_size // int(info["reduction"]))
            return dict(grid=f"{g}x{g}", prefix=0, width=int(info["num_chs"]))
        if e.family in ("swin", "esvit", "swinv2"):
            g = e.img_size // int(m.feature_info[-1]["reduction"])
            return dict(grid=f"{g}x{g}", prefix=0, width=int(m.num_features))
        h, w = m.patch_embed.grid_size
        return dict(grid=f"{h}x{w}", prefix=int(getattr(m, "num_prefix_tokens", 1)), width=int(m.num_features))
    except Exception as ex:  # a row that cannot be built still prints
        return dict(grid="?", prefix="?", width=f"? ({type(ex).__name__})")


def _fmt(t) -> str:
    return "(" + ",".join(f"{x:.3f}" for x in t) + ")"


def print_registry(rows=None) -> None:
    rows = rows if rows is not None else registry_rows()
    head = ["name", "family", "input", "mean", "std", "grid", "prefix", "width", "timm architecture"]
    table = [[r["name"], r["family"], str(r["input"]), _fmt(r["mean"]), _fmt(r["std"]), r["grid"],
              str(r["prefix"]), str(r["width"]), r["timm"]] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(head)]
    for line in [head] + table:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
    print("\nAny timm model name works too. Weights: --teacher-weights FILE (the family's release file), "
          "or timm's hub cache when online.")


def register(subparsers) -> None:
    p = subparsers.add_parser("teachers", help="list the teacher registry (input size, mean/std, grid, width)")
    p.set_defaults(func=lambda args: print_registry() or 0)
