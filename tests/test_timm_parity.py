"""timm stays the source of truth: every forward fdfast swaps into a timm model against timm's own module.

The swapped forwards: ``patch_model``'s attention (timm BEiT / ViT / SwinV2 attention on ``rpb_attention``),
``fuse_residuals``' BEiT blocks and ``pack_linears``' linears and MLPs (``fdfast.fastpath``). For every variant
fdfast can build, each swapped module is compared with an untouched copy of timm's module on the input the
module really receives inside its model (captured from timm's own forward): the output and every gradient
(the module's inputs and all its parameters), and whole models end to end. Every module without a fast path
(EVA's rope attention, Swin v1 windows, QuickGELU or 1x1-conv MLPs, BEiT blocks without layer scale, ...) must
still be timm's class after patching.

Variants (parametrised, so a new registry row or student preset is tested without an edit here):
- every row of the teacher registry (``fdfast teachers``, plugins' rows included) and the open_clip form, shrunk to
  2 blocks of width 36 (3 heads of 12: not a power of two) at its own patch size, 14 x 14 patches (197 tokens,
  201 with DINOv2's registers), batch 1; Swin rows at 2 x 2 windows (49 / 64 / 196 tokens per window, the shifted
  block with its mask); a timm architecture ``TINY`` does not shrink fails the test, and says so;
- ``teacher.kwargs`` / timm-name variants beyond the rows (``EXTRA_TEACHERS``): qk-norm, attention output norm,
  no qkv bias, GELU-tanh MLPs, EVA with fused qkv, ConvNeXt's 1x1-conv MLPs;
- every student the builder makes (``STUDENTS``): shared / per-block relative position bias, absolute position
  embedding, layer scale on / off, no qkv bias, SwinV2; trained with drop path 0.3 (the same seed gives the same
  masks in timm's block and the fused one), 197 tokens, batch 2;
- timm constructor options only a user's own model reaches (``patch_model`` is public API): BEiT's separate qkv
  bias, gated ViT attention, SwinV2's qkv_bias_separate and pretrained window.

Precision modes and the backends they exercise on the CPU (``rpb_attention`` "auto" dispatches per dtype):
| mode | what | attention backends run | checked |
|---|---|---|---|
| fp32 | fp32 weights and math | auto (= SDPA here), sdpa, reference; triton (interpreter, ``TRITON_CASES``) | output + every gradient |
| bf16-autocast | the student's AMP: fp32 weights, bf16 autocast | auto (= fp32-logit bmm path), sdpa, reference | output + every gradient |
| bf16-inference | the teacher as ``fdfast train`` stores it: bf16 weights, autocast, no grad | as bf16-autocast | output |
On a CPU without bf16 units (and where a gradient is needed) ``pack_linears``' modules run ``F.linear``; on a
native-bf16 CPU bf16-inference runs the oneDNN-packed GEMMs. The Triton interpreter computes bf16 wrongly
(ENV.md), so Triton in bf16 is tested on a GPU (``test_patch_model.py -m gpu``).

Tolerances (``TOL``), errors relative to the reference's max |value|:
- fp32: fdfast against timm's module in fp32: 2e-5 for outputs, 2e-4 for gradients (different but exact
  summation orders; measured maxima are listed in the issue note).
- bf16: both against timm's module in fp32 (the truth): fdfast's error may be at most 2x timm's own bf16 error
  plus 2e-3 (the flash-attention tests' rule: no worse than the same math done in plain PyTorch at that
  precision; the floor covers tensors where timm's bf16 error happens to be tiny).
"""
from __future__ import annotations

import copy
import functools

import pytest
import timm
import torch
from timm.models import model_entrypoint
from torch import nn

from fdfast.attention import FAST_ATTENTION, FastSwinV2WindowAttention, patch_model
from fdfast.config import ModelConfig
from fdfast.fastpath import (FusedResidualBlock, PackedLinear, PackedMlp, fuse_residuals, pack_linears,
                             swap_forwards, timm_class)
from fdfast.models.student import build_student
from fdfast.models.teachers import OPEN_CLIP, build_teacher, teacher_names

TOL = {
    "fp32": {"out": 2e-5, "grad": 2e-4},  # relative to max |reference|
    "bf16": {"out_times_timm": 2.0, "grad_times_timm": 3.0, "floor": 2e-3},
}
MODES = ("fp32", "bf16-autocast", "bf16-inference")
# upstream gradients per comparison: bf16 rounding makes one probe's error of a small, cancelling gradient (SwinV2's
# 2-value logit scale) a noisy sample, up to 3.8x timm's on one seed where the means over seeds are equal
# (0.9-1.2x); the mean over 4 probes stays within 1.8x (8 seeds)
PROBES = {"fp32": 1, "bf16-autocast": 4}
# attention backends per mode: on the CPU "auto" is SDPA in fp32 (so "sdpa" is not run twice there) and the
# fp32-logit bmm path in bf16
BACKENDS = {"fp32": ("auto", "reference"), "bf16-autocast": ("auto", "sdpa", "reference"),
            "bf16-inference": ("auto", "sdpa", "reference")}

# ---- the variants ------------------------------------------------------------------------------------------

VIT = dict(embed_dim=33, depth=2, num_heads=3)  # odd widths: head dim 11, MLP 132 (DINOv2-g's SwiGLU: 176)
SWIN = dict(embed_dim=22, depths=(2,), num_heads=(2,))  # one stage: a plain and a shifted block, head dim 11
TINY = {  # timm module of an architecture -> kwargs that shrink it, keeping its variant (norms, layer scale, rope)
    "vision_transformer": VIT, "deit": VIT, "beit": VIT,
    "eva": dict(VIT, embed_dim=36),  # rotary embeddings need an even head dim (12)
    "swin_transformer": SWIN, "swin_transformer_v2": SWIN,
    "convnext": dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)),
    "resnet": dict(layers=(1, 1, 1, 1)),
    "efficientnet": dict(),  # no attention, no MLP: only "nothing switched" is checked
}
EXTRA_TEACHERS = {  # teacher.kwargs and plain timm names: variants the registry rows do not show
    "vit-qk-norm": ("vit_small_patch16_224", dict(qk_norm=True)),
    "vit-attn-out-norm": ("vit_small_patch16_224", dict(scale_attn_norm=True)),
    "vit-no-qkv-bias": ("vit_small_patch16_224", dict(qkv_bias=False)),
    "vit-gelu-tanh": ("vit_small_patch16_224", dict(act_layer="gelu_tanh")),
    "eva02-fused-qkv": ("eva02_base_patch14_224", dict(qkv_fused=True)),
    "convnext-conv-mlp": ("convnext_atto", {}),
}
TEACHERS = [*teacher_names(), OPEN_CLIP + "ViT-B-16", OPEN_CLIP + "ViT-B-16-quickgelu", *EXTRA_TEACHERS]

_STUDENT = dict(size="tiny", patch_size=16, img_size=224, drop_path=0.3, kwargs=VIT)  # 197 tokens
STUDENTS = {
    "shared-rpb": ModelConfig(**_STUDENT),  # FD's student
    "per-block-rpb": ModelConfig(**dict(_STUDENT, pos_bias="per_block")),
    "abs-pos": ModelConfig(**dict(_STUDENT, pos_bias="abs")),
    "no-layer-scale": ModelConfig(**dict(_STUDENT, kwargs=dict(VIT, init_values=None))),
    "no-qkv-bias": ModelConfig(**dict(_STUDENT, kwargs=dict(VIT, qkv_bias=False))),
    # 56 px / 4 = 14 x 14 tokens: 4 windows of 7 x 7 = 49 tokens, block 1 shifted with its [4, 49, 49] mask
    "swinv2": ModelConfig(arch="swinv2", size="tiny", img_size=56, drop_path=0.3,
                          kwargs=dict(SWIN, depths=[2], num_heads=[2], window_size=7)),
}
# Triton under the interpreter costs seconds per call: one case per fast attention class and bias kind
TRITON_CASES = ("shared-rpb", "per-block-rpb", "swinv2", "dino-vit-s16")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: a second OpenMP thread only adds hand-offs (10x slower on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- building ----------------------------------------------------------------------------------------------

def _teacher_spec(name: str) -> tuple[str, dict]:
    return EXTRA_TEACHERS.get(name, (name, {}))


def _tiny_kwargs(arch: str) -> dict:
    module = model_entrypoint(arch.split(".")[0]).__module__.rsplit(".", 1)[-1]
    if module not in TINY:
        pytest.fail(f"timm {arch} (timm.models.{module}) has no tiny configuration: add one to TINY in {__file__}")
    return TINY[module]


def _geometry_kwargs(model: nn.Module) -> dict:
    """img_size for 14 x 14 patches (ViT-like) or 2 x 2 windows (Swin); CNNs: 32 px."""
    embed = getattr(model, "patch_embed", None)
    if getattr(model, "layers", None) is not None and embed is not None:  # Swin: patch 4, windows from block 0
        window = model.layers[0].blocks[0].window_size
        window = window if isinstance(window, int) else window[0]
        return dict(img_size=embed.patch_size[0] * 2 * window)
    if embed is not None:
        return dict(img_size=embed.patch_size[0] * 14)
    return dict(img_size=32)


@functools.lru_cache(maxsize=None)
def _teacher_template(name: str):
    """(tiny timm backbone as the registry builds it, random weights and trainable; image size)."""
    from fdfast.models.teachers import get_entry
    arch, kw = _teacher_spec(name)
    tiny = dict(_tiny_kwargs(get_entry(arch).timm_name), **kw)
    with torch.device("meta"):  # the patch / window size, which sets the image size
        size = _geometry_kwargs(build_teacher(arch, weights="random", **tiny).backbone)["img_size"]
    torch.manual_seed(0)
    backbone = build_teacher(arch, weights="random", img_size=size, **tiny).backbone
    return randomised(backbone.requires_grad_(True).train(False)), size


def randomised(model: nn.Module, seed: int = 1) -> nn.Module:
    """Random values, fixed seed, for every parameter timm initialises to one constant (relative position bias
    tables, q / v biases, layer scales, SwinV2's zero-initialised post-norms, logit scales), which would hide a
    mistake in a gradient or zero it outright; logit scales in exp(1.5..2.5) = 4.5..12, below timm's clamp."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "logit_scale" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 1.5)
            elif p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _fast_kinds(model: nn.Module) -> dict[str, tuple[type, ...]]:
    """fdfast's fast classes, by the entry point that swaps them in."""
    return {"attention": tuple(FAST_ATTENTION.values()), "residual": (FusedResidualBlock,),
            "linear": (PackedLinear, PackedMlp)}


def swap(module: nn.Module, kind: str, backend: str) -> nn.Module:
    """A copy of ``module`` with fdfast's forwards of ``kind`` swapped in through the public entry points."""
    fast = copy.deepcopy(module)
    if kind == "attention":
        patch_model(fast, backend=backend)
    elif kind == "residual":
        fuse_residuals(fast)
    else:
        pack_linears(fast)
    return fast


# ---- comparing -----------------------------------------------------------------------------------------------

def _captured_inputs(model: nn.Module, images: torch.Tensor, modules: list[nn.Module]) -> dict[int, tuple]:
    """What each module receives inside ``model``'s forward (timm's): id(module) -> (args, kwargs), detached."""
    seen = {}

    def keep(value):
        return value.detach().clone() if isinstance(value, torch.Tensor) else value

    def hook(module, args, kwargs):
        seen.setdefault(id(module), (tuple(keep(a) for a in args), {k: keep(v) for k, v in kwargs.items()}))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for h in handles:
            h.remove()
    return seen


# SwinV2's shift mask, ViT's explicit mask: constants; a whole model's pixels: their gradient is timm's patch
# embedding's (the swapped modules' input gradients are checked module by module)
NO_GRAD_INPUTS = ("mask", "attn_mask", "images")


def run(module: nn.Module, args: tuple, kwargs: dict, mode: str, probes: int) -> tuple[torch.Tensor, list[dict]]:
    """module(*args, **kwargs) in ``mode``: (output fp32, per probe {name: gradient fp32}). A probe is a fixed
    random upstream gradient of the output (``probes`` of them, one forward); gradients are taken of the float
    inputs (x, the shared bias) and of every parameter."""
    module = copy.deepcopy(module)
    grads_wanted = mode != "bf16-inference" and probes > 0
    if mode == "bf16-inference":
        module = module.to(torch.bfloat16).requires_grad_(False)
    inputs = {}

    def prepare(key, value):
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return value
        value = value.to(torch.bfloat16) if mode == "bf16-inference" else value.clone()
        if grads_wanted and key not in NO_GRAD_INPUTS:
            inputs[f"input:{key}"] = value.requires_grad_()
        return value

    args = tuple(prepare(str(i), a) for i, a in enumerate(args))
    kwargs = {k: prepare(k, v) for k, v in kwargs.items()}
    params = {n: p for n, p in module.named_parameters() if p.requires_grad} if grads_wanted else {}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32"), \
            torch.set_grad_enabled(grads_wanted):
        out = module(*args, **kwargs)
    out = (out[0] if isinstance(out, tuple) else out).float()
    if not grads_wanted:
        return out.detach(), []
    wrt = {**inputs, **params}
    per_probe = []
    for i in range(probes):
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(3 + i))
        grads = torch.autograd.grad(out, list(wrt.values()), probe, retain_graph=True, allow_unused=True)
        per_probe.append({k: (torch.zeros_like(v) if g is None else g).float() for (k, v), g in zip(wrt.items(),
                                                                                                   grads)})
    return out.detach(), per_probe


# Where fdfast's bf16 gradients are known to be less accurate than timm's own: the factor (times timm's error, plus
# TOL's floor) they are held to meanwhile, and why. test_known_deviations_are_real pins each with a strict xfail
# on the mean over seeds, so fixing the cause fails it until the entry goes.
CPU_BF16_SWINV2 = (
    "rpb_attention 'auto' on the CPU in bf16 (kernels/rpb_attention.py _CpuLowPrecisionAttention.backward: P saved "
    "in bf16, dP and dS = P (dP - rowsum(dP P)) rounded to bf16 before dbias / dq / dk) loses precision in SwinV2's "
    "reductions of dS: the logit-scale and CPB-MLP gradients carry 1.6-2.2x timm's autocast error on average over "
    "8 seeds, up to 4.6x on one (SwinV2 student windows: q, k, v [8, 2, 49, 11] bf16, bias [2, 49, 49] fp32, mask "
    "[4, 49, 49], logit scale 4.5-12); backends 'reference' and 'sdpa' on the same inputs: 0.9-1.1x timm's (timm "
    "keeps the softmax and dS in fp32)")
KNOWN_DEVIATIONS = {  # (fast class, backend, mode) -> (gradient bound: times timm's error, why)
    (FastSwinV2WindowAttention, "auto", "bf16-autocast"): (6.0, CPU_BF16_SWINV2),
}


def known_deviation(fast_module: nn.Module, backend: str, mode: str) -> float | None:
    """The gradient factor a KNOWN_DEVIATIONS entry allows ``fast_module`` (or a module inside it), else None."""
    classes = {type(m) for m in fast_module.modules()}
    return max([times for (cls, b, m), (times, _) in KNOWN_DEVIATIONS.items()
                if cls in classes and b == backend and m == mode], default=None)


def rel_error(got: torch.Tensor, want: torch.Tensor, floor: float = 1e-6) -> float:
    """max |got - want| / max |want|; ``floor`` bounds the denominator from below."""
    return ((got - want).abs().max() / want.abs().max().clamp_min(floor)).item()


GRAD_FLOOR = 1e-3  # a gradient is compared at >= 1e-3 x its module's largest one: some are zero by symmetry
# (a k-norm bias shifts every key alike and softmax ignores it), so their values are rounding noise


def parity(timm_module: nn.Module, fast_modules: dict[str, nn.Module], args: tuple, kwargs: dict, mode: str
           ) -> dict[str, dict[str, float]]:
    """Errors of each fdfast module ({backend: module}) and, in bf16, of timm's own module against timm's module
    in fp32: {backend: {"out", "grad" (the worst gradient), "timm_out", "timm_grad"}}. Asserts the tolerances,
    listing every tensor beyond them (a ``KNOWN_DEVIATIONS`` entry widens the bf16 gradient bound)."""
    probes = PROBES.get(mode, 0)
    ref = run(timm_module, args, kwargs, "fp32", probes)
    low = run(timm_module, args, kwargs, mode, probes) if mode != "fp32" else None
    results, beyond = {}, []
    for backend, fast in fast_modules.items():
        grad_times = known_deviation(fast, backend, mode) or TOL["bf16"]["grad_times_timm"]
        results[backend], over = _errors(run(fast, args, kwargs, mode, probes), ref, low, mode, grad_times)
        beyond += [(backend, *o) for o in over]
    assert not beyond, "beyond tolerance (backend, tensor, error, bound): " + "; ".join(
        f"{b} {k} {e:.3g} > {t:.3g}" for b, k, e, t in beyond)
    return results


def _grad_errors(per_probe: list[dict], ref_per_probe: list[dict]) -> dict[str, float]:
    """{tensor: relative error, the mean over probes}; each probe's floor is GRAD_FLOOR x its largest gradient."""
    errors = {}
    for grads, ref in zip(per_probe, ref_per_probe):
        floor = GRAD_FLOOR * max(g.abs().max().item() for g in ref.values()) + 1e-12
        for key, want in ref.items():
            errors[key] = errors.get(key, 0.0) + rel_error(grads[key], want, floor) / len(per_probe)
    return errors


def _errors(got, ref, timm_low, mode: str, grad_times: float
            ) -> tuple[dict[str, float], list[tuple[str, float, float]]]:
    """(worst errors, [(tensor, error, bound) beyond the tolerance]); bf16 gradients within ``grad_times`` x
    timm's error + the floor."""
    (out, grads), (ref_out, ref_grads) = got, ref
    assert out.shape == ref_out.shape and len(grads) == len(ref_grads)
    grad_errors = _grad_errors(grads, ref_grads) if grads else {}
    errors = {"out": rel_error(out, ref_out), "grad": max(grad_errors.values(), default=0.0)}
    if mode == "fp32":
        bounds = {"out": TOL["fp32"]["out"], **{k: TOL["fp32"]["grad"] for k in grad_errors}}
    else:
        (timm_out, timm_grads), tol = timm_low, TOL["bf16"]
        timm_grad_errors = _grad_errors(timm_grads, ref_grads) if grads else {}
        errors.update(timm_out=rel_error(timm_out, ref_out), timm_grad=max(timm_grad_errors.values(), default=0.0))
        bounds = {"out": tol["out_times_timm"] * errors["timm_out"] + tol["floor"],
                  **{k: grad_times * timm_grad_errors[k] + tol["floor"] for k in grad_errors}}
    over = [(k, e, bounds[k]) for k, e in (("out", errors["out"]), *grad_errors.items()) if e > bounds[k]]
    return errors, over


def _worst(into: dict, errors: dict) -> None:
    for name, err in errors.items():
        into[name] = max(into.get(name, 0.0), err)


def fingerprint(module: nn.Module) -> str:
    """What decides which code a module runs: its structure, its tensors' shapes and dtypes, the plain attributes
    of it and its children (two modules with one fingerprint differ only in values)."""
    plain = (bool, int, float, str, tuple, type(None))
    parts = [repr(module)]
    for name, sub in module.named_modules():
        attrs = sorted((k, repr(v)) for k, v in vars(sub).items() if isinstance(v, plain))
        tensors = [(n, tuple(t.shape), t.dtype, t.requires_grad)
                   for n, t in (*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False))]
        parts.append(f"{name}:{type(sub).__qualname__}:{attrs}:{tensors}")
    return "\n".join(parts)


def _shapes(args: tuple, kwargs: dict) -> str:
    return repr([(k, tuple(v.shape) if isinstance(v, torch.Tensor) else v) for k, v in (*enumerate(args),
                                                                                        *kwargs.items())])


_MODEL_RESULTS: dict[tuple, dict] = {}  # registry rows that shrink to the same model share one comparison


def module_parity(model: nn.Module, images: torch.Tensor, mode: str, backends=None,
                  kinds=("attention", "residual", "linear")) -> dict:
    """Every module of ``model`` a fast forward covers against timm's, on its input inside ``model``, in ``mode``
    and each attention backend: {(kind, backend): worst errors}. Modules alike (same fingerprint and input shapes:
    the blocks of a model) are compared once; so are models alike."""
    backends = backends or BACKENDS[mode]
    key = (fingerprint(model), tuple(images.shape), mode, backends, kinds)
    if key in _MODEL_RESULTS:
        return _MODEL_RESULTS[key]
    results = {}
    for kind in kinds:
        names = {name for name, _ in swap_forwards(copy.deepcopy(model), _fast_kinds(model)[kind])}
        # outermost only: an MLP's fc1 / fc2 are compared as part of it
        originals = [m for n, m in model.named_modules() if n in names and n.rpartition(".")[0] not in names]
        captured = _captured_inputs(model, images, originals)  # modules called by their parent (not BEiT's qkv)
        alike = {}
        for module in originals:
            if id(module) in captured:
                args, kwargs = captured[id(module)]
                alike.setdefault(fingerprint(module) + _shapes(args, kwargs), (module, args, kwargs))
        assert bool(alike) == bool(originals), f"no {kind} module fdfast swaps ran in {type(model).__name__}"
        kind_backends = backends if kind == "attention" else ("-",)
        for module, args, kwargs in alike.values():
            fasts = {backend: swap(module, kind, backend) for backend in kind_backends}
            assert all(type(f) is not type(module) and timm_class(type(f)) is type(module) for f in fasts.values())
            for backend, errors in parity(module, fasts, args, kwargs, mode).items():
                _worst(results.setdefault((kind, backend), {}), errors)
    _MODEL_RESULTS[key] = results
    return results


# ---- the tests -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", TEACHERS)
def test_teacher_modules_match_timm(name, mode):
    """Each attention, BEiT block and linear / MLP fdfast swaps into a registry teacher against timm's own."""
    model, size = _teacher_template(name)
    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    module_parity(model, images, mode)


@pytest.mark.parametrize("name", TEACHERS)
def test_modules_without_a_fast_path_stay_timm(name):
    """patch_model / pack_linears / fuse_residuals switch only modules their fast forward covers; every other
    module keeps timm's class (its forward), and the whole teacher computes timm's tokens."""
    timm_model, size = _teacher_template(name)
    model = copy.deepcopy(timm_model)
    before = {n: type(m) for n, m in model.named_modules()}
    supported = [n for n, m in model.named_modules() if type(m) in FAST_ATTENTION]
    if supported:
        patch_model(model, backend="reference")
    else:  # nothing to patch: a clear error, nothing changed
        with pytest.raises(ValueError, match="no attention module fdfast supports"):
            patch_model(model)
    pack_linears(model)
    fuse_residuals(model)
    fast_classes = {c for kind in _fast_kinds(model).values() for c in kind}
    for n, m in model.named_modules():
        if type(m) is not before[n]:
            assert type(m) in fast_classes and timm_class(type(m)) is before[n], n
            assert not hasattr(type(m), "fits") or type(m).fits(m), n
        elif any(timm_class(c) is before[n] for c in fast_classes):  # a fast path exists, but not for this one
            fast = next(c for c in fast_classes if timm_class(c) is before[n])
            assert hasattr(fast, "fits") and not fast.fits(m), f"{n}: {before[n].__name__} left unswitched"
    # attention modules of classes fdfast has no forward for (EVA, Swin v1) are untouched
    for n, m in model.named_modules():
        if hasattr(m, "num_heads") and isinstance(getattr(m, "attn_drop", None), nn.Module):
            assert (type(m) in FAST_ATTENTION.values()) == (before[n] in FAST_ATTENTION), n
    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tokens, ref = _tokens(model, images), _tokens(timm_model, images)
    assert rel_error(tokens, ref) < TOL["fp32"]["out"]


def _tokens(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    from fdfast.models import tokens
    return tokens.final_tokens(model, images)


@pytest.mark.parametrize("mode", MODES[:2])
@pytest.mark.parametrize("name", list(STUDENTS))
def test_student_matches_timm(name, mode):
    """The student as fdfast trains it (build_student(fast=True)) against timm's (fast=False), whole model in
    train mode with drop path 0.3 on the same seed: tokens and every gradient, each attention backend; and
    module by module."""
    cfg = STUDENTS[name]
    torch.manual_seed(0)
    timm_model = randomised(build_student(cfg)).train()
    fast_model = build_student(cfg, fast=True).train()
    fast_model.load_state_dict(timm_model.state_dict(), strict=True)
    size = cfg.img_size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    fasts = {b: _Tokens(patch_model(copy.deepcopy(fast_model), backend=b)) for b in BACKENDS[mode]}
    parity(_Tokens(timm_model), fasts, (), {"images": images}, mode)
    module_parity(timm_model.eval(), images, mode, kinds=("attention", "residual"))  # what fast=True swaps


class _Tokens(nn.Module):
    """A model's final tokens as its forward, drawing drop path masks from a fixed seed on every call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images):
        torch.manual_seed(7)
        return _tokens(self.model, images)


@pytest.mark.parametrize("name", TRITON_CASES)
def test_triton_interpreter_matches_timm(name):
    """backend="triton" (the CUDA kernel, here through the interpreter) against timm's attention, fp32."""
    if name in STUDENTS:
        torch.manual_seed(0)
        model, size = randomised(build_student(STUDENTS[name])).eval(), STUDENTS[name].img_size
    else:
        model, size = _teacher_template(name)
    images = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(2))
    results = module_parity(model, images, "fp32", backends=("triton",))
    assert ("attention", "triton") in results


def test_drop_path_masks_follow_the_seed():
    """fuse_residuals draws timm's masks: the same seed gives timm's output exactly, another seed another one."""
    torch.manual_seed(0)
    timm_model = randomised(build_student(STUDENTS["shared-rpb"])).train()
    fused = copy.deepcopy(timm_model)
    assert fuse_residuals(fused) == 2
    images = torch.randn(2, 3, 224, 224)
    out = {}
    for key, model, seed in (("timm", timm_model, 5), ("fused", fused, 5), ("other", fused, 6)):
        torch.manual_seed(seed)
        out[key] = model.forward_features(images)
    assert rel_error(out["fused"], out["timm"]) < TOL["fp32"]["out"]
    assert rel_error(out["other"], out["timm"]) > 1e-2  # drop path is on: the masks matter


# timm modules built directly: options only a user's own model reaches (patch_model is public API)
def _beit_attention(**kw):
    from timm.models.beit import Attention
    return Attention(33, num_heads=3, qkv_bias=True, window_size=(4, 4), **kw)


def _vit_attention(**kw):
    from timm.layers.attention import Attention
    return Attention(33, num_heads=3, qkv_bias=True, **kw)


def _swinv2_attention(**kw):
    from timm.models.swin_transformer_v2 import WindowAttention
    return WindowAttention(22, window_size=(7, 7), num_heads=2, **kw)


MODULES = {  # name: (module, inputs (args, kwargs))
    "beit-qkv-bias-separate": (lambda: _beit_attention(qkv_bias_separate=True),
                               lambda g: ((torch.randn(3, 17, 33, generator=g),), {})),
    "beit-shared-plus-own-table": (lambda: _beit_attention(),
                                   lambda g: ((torch.randn(1, 17, 33, generator=g),),
                                              {"shared_rel_pos_bias": torch.randn(3, 17, 17, generator=g)})),
    "vit-gated": (lambda: _vit_attention(gated=True), lambda g: ((torch.randn(2, 197, 33, generator=g),), {})),
    "vit-head-dim-20": (lambda: _vit_attention(attn_head_dim=20),
                        lambda g: ((torch.randn(1, 65, 33, generator=g),), {})),
    "swinv2-qkv-bias-separate": (lambda: _swinv2_attention(qkv_bias_separate=True),
                                 lambda g: ((torch.randn(4, 49, 22, generator=g),), {})),
    "swinv2-pretrained-window-masked": (
        lambda: _swinv2_attention(pretrained_window_size=(4, 4)),
        lambda g: ((torch.randn(8, 49, 22, generator=g),),
                   {"mask": torch.where(torch.rand(4, 49, 49, generator=g) < 0.3, -100.0, 0.0)})),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(MODULES))
def test_timm_attention_options_match_timm(name, mode):
    build, inputs = MODULES[name]
    torch.manual_seed(0)
    module = randomised(build()).eval()
    args, kwargs = inputs(torch.Generator().manual_seed(4))
    parity(module, {b: swap(module, "attention", b) for b in BACKENDS[mode]}, args, kwargs, mode)


# ---- known deviations, pinned ----------------------------------------------------------------------------------

SEEDS = range(6)  # one seed's bf16 error of a cancelling reduction is a noisy sample: compare means


@pytest.mark.parametrize("backend", [
    "sdpa", "reference",
    pytest.param("auto", marks=pytest.mark.xfail(strict=True, reason=CPU_BF16_SWINV2))])
def test_known_deviations_are_real(backend):
    """SwinV2's logit-scale and CPB-MLP gradients in bf16 (both window attentions of the student: plain and
    shifted), error relative to timm's own bf16 error, averaged over seeds: at most 1.5x (sampling noise)."""
    keys = ("logit_scale", "cpb_mlp.2.weight")
    ratios = {(block, key): [] for block in (0, 1) for key in keys}
    for seed in SEEDS:
        torch.manual_seed(seed)
        model = randomised(build_student(STUDENTS["swinv2"]), seed=seed).eval()
        images = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(100 + seed))
        for block in (0, 1):
            attn = model.layers[0].blocks[block].attn
            args, kwargs = _captured_inputs(model, images, [attn])[id(attn)]
            probes = PROBES["bf16-autocast"]
            ref = run(attn, args, kwargs, "fp32", probes)[1]
            timm_errors = _grad_errors(run(attn, args, kwargs, "bf16-autocast", probes)[1], ref)
            errors = _grad_errors(run(swap(attn, "attention", backend), args, kwargs, "bf16-autocast", probes)[1], ref)
            for key in keys:
                ratios[block, key].append(errors[key] / timm_errors[key])
    means = {k: sum(v) / len(v) for k, v in ratios.items()}
    assert max(means.values()) <= 1.5, means
