"""timm stays the source of truth: every forward fdfast swaps into a timm model against timm's own module.

The swapped forwards are ``patch_model``'s attention (timm BEiT / ViT / SwinV2 attention on ``rpb_attention``),
``fuse_residuals``' BEiT blocks and ``pack_linears``' linears and MLPs (``fdfast.fastpath``). Each swapped module
is compared with an untouched copy of timm's module on the input it really receives inside its model (captured
from timm's forward): the output and every gradient (its float inputs and all its parameters); whole teachers and
students are compared end to end. Every module without a fast path (EVA's rope attention, Swin v1 windows,
QuickGELU or 1x1-conv MLPs, BEiT blocks without layer scale, ...) must still be timm's class after patching.

Variants (parametrised: a new registry row, student preset or timm option is one entry, the tests follow):
- every teacher registry row (``fdfast teachers``, plugins' rows included) and the open_clip form, shrunk by
  ``TINY`` to 2 blocks of odd width 33 (3 heads of 11) at the row's own patch size and 14 x 14 patches (197
  tokens, 201 with DINOv2's registers), batch 1; Swin rows at 2 x 2 windows (49 / 64 / 196 tokens each, the
  second block shifted with its mask). An architecture ``TINY`` cannot shrink fails, naming the timm module;
- ``EXTRA_TEACHERS``: teacher.kwargs / timm-name variants no row shows (qk-norm, attention output norm, no qkv
  bias, GELU-tanh MLPs, EVA with fused qkv, ConvNeXt's 1x1-conv MLPs);
- ``STUDENTS``: what the student builder makes (shared / per-block relative position bias, absolute position
  embedding, layer scale on / off, no qkv bias, SwinV2), trained with drop path 0.3 on the same seed in timm's
  model and fdfast's (so the masks are the same), 197 tokens (SwinV2: 8 windows of 49), batch 2;
- ``MODULES``: timm constructor options only a user's own model reaches (``patch_model`` is public API).

Precision modes, and the attention backends each runs (``rpb_attention`` "auto" dispatches per dtype):
| mode | what it is | attention backends | compared |
|---|---|---|---|
| fp32 | fp32 weights and math | auto (on the CPU: SDPA), reference; triton through the interpreter (``TRITON_CASES``) | output, every gradient |
| bf16-autocast | the student's AMP | auto (on the CPU: the fp32-logit bmm path), sdpa, reference | output, every gradient (4 probes) |
| bf16-inference | the teacher as ``fdfast train`` keeps it: bf16 weights, autocast, no grad | auto, sdpa, reference | output |
``pack_linears``' modules run ``F.linear`` where a gradient is needed or the CPU has no bf16 units, and the
oneDNN-packed bf16 GEMMs in bf16-inference on a native-bf16 CPU. Triton's interpreter computes bf16 wrongly
(ENV.md): Triton in bf16 is tested on a GPU (``test_patch_model.py -m gpu``).

Tolerances (``TOL``), errors relative to the reference tensor's max |value|:
- fp32, fdfast against timm's module: 2e-5 (outputs), 2e-4 (gradients): both exact, summed in other orders.
- bf16, fdfast and timm's own module both against timm's module in fp32: fdfast's output error at most 2x timm's
  plus 2e-3 (the flash-attention tests' rule), each gradient's at most 3x timm's plus 2e-3, its error the mean
  over 4 random upstream gradients ("probes"): a cancelling reduction (SwinV2's 2-value logit scale) has a noisy
  error per sample, up to ~2.4x timm's on one seed where the means over seeds agree (0.9-1.2x).
- A gradient is compared at no less than ``GRAD_FLOOR`` x the largest gradient of its module: some are zero by
  symmetry (a k-norm bias shifts all keys alike), their values rounding noise.
- ``KNOWN_DEVIATIONS``: measured, explained, held to a wider bound, pinned by a strict xfail.
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from timm.models import model_entrypoint
from torch import nn

from fdfast.attention import FAST_ATTENTION, FastSwinV2WindowAttention, patch_model
from fdfast.config import ModelConfig
from fdfast.fastpath import (FusedResidualBlock, PackedLinear, PackedMlp, fuse_residuals, pack_linears,
                             swap_forwards, timm_class)
from fdfast.models import tokens
from fdfast.models.student import build_student
from fdfast.models.teachers import OPEN_CLIP, build_teacher, get_entry, teacher_names

# ---- tolerances ------------------------------------------------------------------------------------------------

TOL = {
    "fp32": {"out": 2e-5, "grad": 2e-4},
    "bf16": {"out_times_timm": 2.0, "grad_times_timm": 3.0, "floor": 2e-3},
}
GRAD_FLOOR = 1e-3
MODES = ("fp32", "bf16-autocast", "bf16-inference")
PROBES = {"fp32": 1, "bf16-autocast": 4}  # upstream gradients per comparison (bf16-inference: none)
BACKENDS = {"fp32": ("auto", "reference"),  # on the CPU "auto" is SDPA in fp32: "sdpa" would run it twice
            "bf16-autocast": ("auto", "sdpa", "reference"), "bf16-inference": ("auto", "sdpa", "reference")}

# ---- the variants ----------------------------------------------------------------------------------------------

VIT = dict(embed_dim=33, depth=2, num_heads=3)  # odd widths: head dim 11, MLP 132 (DINOv2-g's SwiGLU: 176)
SWIN = dict(embed_dim=22, depths=(2,), num_heads=(2,))  # one stage: a plain and a shifted block, head dim 11
TINY = {  # timm module of an architecture -> kwargs that shrink it, keeping its variant (norms, layer scale, rope)
    "vision_transformer": VIT, "deit": VIT, "beit": VIT,
    "eva": dict(VIT, embed_dim=36),  # rotary embeddings need an even head dim (12)
    "swin_transformer": SWIN, "swin_transformer_v2": SWIN,
    "convnext": dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32)),
    "resnet": dict(layers=(1, 1, 1, 1)),
    "efficientnet": dict(),  # neither attention nor MLP: only "nothing is switched" applies
}
EXTRA_TEACHERS = {  # name -> (timm name, teacher.kwargs)
    "vit-qk-norm": ("vit_small_patch16_224", dict(qk_norm=True)),
    "vit-attn-out-norm": ("vit_small_patch16_224", dict(scale_attn_norm=True)),
    "vit-no-qkv-bias": ("vit_small_patch16_224", dict(qkv_bias=False)),
    "vit-gelu-tanh": ("vit_small_patch16_224", dict(act_layer="gelu_tanh")),
    "eva02-fused-qkv": ("eva02_base_patch14_224", dict(qkv_fused=True)),
    "convnext-conv-mlp": ("convnext_atto", {}),
}
TEACHERS = [*teacher_names(), OPEN_CLIP + "ViT-B-16", OPEN_CLIP + "ViT-B-16-quickgelu", *EXTRA_TEACHERS]

_STUDENT = dict(size="tiny", patch_size=16, img_size=224, drop_path=0.3, kwargs=VIT)  # 14 x 14 + CLS = 197 tokens
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
TRITON_CASES = ("shared-rpb", "per-block-rpb", "swinv2", "dino-vit-s16")  # seconds each in the interpreter


def _beit_attention(**kw):
    from timm.models.beit import Attention
    return Attention(33, num_heads=3, qkv_bias=True, window_size=(4, 4), **kw)


def _vit_attention(**kw):
    from timm.layers.attention import Attention
    return Attention(33, num_heads=3, qkv_bias=True, **kw)


def _swinv2_attention(**kw):
    from timm.models.swin_transformer_v2 import WindowAttention
    return WindowAttention(22, window_size=(7, 7), num_heads=2, **kw)


MODULES = {  # name: (timm module, generator -> its (args, kwargs))
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

# ---- known deviations ------------------------------------------------------------------------------------------

# Where fdfast's bf16 gradients are known to be less accurate than timm's own: the factor of timm's error (plus the
# floor) they are held to meanwhile, and why. test_known_deviations_are_real pins each with a strict xfail on the
# mean over seeds, so fixing the cause fails that test until the entry goes.
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


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: a second OpenMP thread only adds hand-offs (10x slower on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- building --------------------------------------------------------------------------------------------------

FAST_KINDS = {  # the entry point that swaps them in -> fdfast's fast classes
    "attention": tuple(FAST_ATTENTION.values()), "residual": (FusedResidualBlock,),
    "linear": (PackedLinear, PackedMlp)}


def _tiny_kwargs(timm_name: str) -> dict:
    module = model_entrypoint(timm_name.split(".")[0]).__module__.rsplit(".", 1)[-1]
    if module not in TINY:
        pytest.fail(f"timm {timm_name} (timm.models.{module}) has no tiny configuration: add one to TINY in "
                    f"tests/test_timm_parity.py")
    return TINY[module]


def _image_size(model: nn.Module) -> int:
    """14 x 14 patches (ViT-like), 2 x 2 windows (Swin: patch 4, window of block 0), 32 px (CNN)."""
    embed = getattr(model, "patch_embed", None)
    if embed is None:
        return 32
    if getattr(model, "layers", None) is not None:
        window = model.layers[0].blocks[0].window_size
        return embed.patch_size[0] * 2 * (window if isinstance(window, int) else window[0])
    return embed.patch_size[0] * 14


@functools.lru_cache(maxsize=None)
def teacher_template(name: str) -> tuple[nn.Module, int]:
    """(the tiny timm backbone the registry builds for ``name``, randomised and trainable; its image size)."""
    arch, kw = EXTRA_TEACHERS.get(name, (name, {}))
    tiny = dict(_tiny_kwargs(get_entry(arch).timm_name), **kw)
    with torch.device("meta"):  # the patch / window size, which sets the image size
        size = _image_size(build_teacher(arch, weights="random", **tiny).backbone)
    torch.manual_seed(0)
    backbone = build_teacher(arch, weights="random", img_size=size, **tiny).backbone
    return randomised(backbone.requires_grad_(True)), size


def randomised(model: nn.Module, seed: int = 1) -> nn.Module:
    """Random values for every parameter timm initialises to one constant (relative position bias tables, q / v
    biases, layer scales, SwinV2's zero post-norms), which would hide a wrong gradient or zero it; logit scales
    in exp(1.5..2.5) = 4.5..12, below timm's clamp. In place; returns the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "logit_scale" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 1.5)
            elif p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return model


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


class Tokens(nn.Module):
    """A model's final tokens (``fdfast.models.tokens``) as its forward; drop path masks from one fixed seed."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(7)
        return tokens.final_tokens(self.model, images)


# ---- running and comparing -------------------------------------------------------------------------------------

def captured_inputs(model: nn.Module, images: torch.Tensor, modules: list[nn.Module]) -> dict[int, tuple]:
    """What each module receives in ``model``'s forward: id(module) -> (args, kwargs), detached copies. Modules
    their parent never calls (BEiT's qkv: F.linear on its weight) are absent."""
    seen = {}

    def keep(value):
        return value.detach().clone() if isinstance(value, torch.Tensor) else value

    def hook(module, args, kwargs):
        seen.setdefault(id(module), (tuple(keep(a) for a in args), {k: keep(v) for k, v in kwargs.items()}))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
    try:
        with torch.no_grad():
            tokens.final_tokens(model, images)
    finally:
        for h in handles:
            h.remove()
    return seen


# SwinV2's shift mask, ViT's explicit mask: constants; a whole model's pixels: their gradient is timm's patch
# embedding's (each swapped module's input gradient is checked module by module)
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
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32"), torch.set_grad_enabled(grads_wanted):
        out = module(*args, **kwargs)
    out = (out[0] if isinstance(out, tuple) else out).float()
    wrt = {**inputs, **params}
    if not grads_wanted or not wrt:  # inference, or a frozen module on constant inputs
        return out.detach(), []
    per_probe = []
    for i in range(probes):
        probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(3 + i))
        grads = torch.autograd.grad(out, list(wrt.values()), probe, retain_graph=True, allow_unused=True)
        per_probe.append({k: (torch.zeros_like(v) if g is None else g).float()
                          for (k, v), g in zip(wrt.items(), grads)})
    return out.detach(), per_probe


def rel_error(got: torch.Tensor, want: torch.Tensor, floor: float = 1e-6) -> float:
    """max |got - want| / max |want|, the denominator at least ``floor``."""
    return ((got - want).abs().max() / want.abs().max().clamp_min(floor)).item()


def grad_errors(per_probe: list[dict], ref_per_probe: list[dict]) -> dict[str, float]:
    """{tensor: relative error, the mean over probes}; each probe's floor is GRAD_FLOOR x its largest gradient."""
    errors = {}
    for grads, ref in zip(per_probe, ref_per_probe):
        floor = GRAD_FLOOR * max(g.abs().max().item() for g in ref.values()) + 1e-12
        for key, want in ref.items():
            errors[key] = errors.get(key, 0.0) + rel_error(grads[key], want, floor) / len(per_probe)
    return errors


def _errors(got, ref, timm_low, mode: str, grad_times: float
            ) -> tuple[dict[str, float], list[tuple[str, float, float]]]:
    """(worst errors, [(tensor, error, bound) beyond the tolerance]); in bf16 a gradient's bound is ``grad_times``
    x timm's own error + the floor."""
    (out, grads), (ref_out, ref_grads) = got, ref
    assert out.shape == ref_out.shape and len(grads) == len(ref_grads)
    errors_of = grad_errors(grads, ref_grads) if grads else {}
    errors = {"out": rel_error(out, ref_out), "grad": max(errors_of.values(), default=0.0)}
    if mode == "fp32":
        bounds = {"out": TOL["fp32"]["out"], **{k: TOL["fp32"]["grad"] for k in errors_of}}
    else:
        (timm_out, timm_grads), tol = timm_low, TOL["bf16"]
        timm_errors_of = grad_errors(timm_grads, ref_grads) if grads else {}
        errors.update(timm_out=rel_error(timm_out, ref_out), timm_grad=max(timm_errors_of.values(), default=0.0))
        bounds = {"out": tol["out_times_timm"] * errors["timm_out"] + tol["floor"],
                  **{k: grad_times * timm_errors_of[k] + tol["floor"] for k in errors_of}}
    over = [(k, e, bounds[k]) for k, e in (("out", errors["out"]), *errors_of.items()) if e > bounds[k]]
    return errors, over


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
    return repr([(k, tuple(v.shape) if isinstance(v, torch.Tensor) else v)
                 for k, v in (*enumerate(args), *kwargs.items())])


_MODEL_RESULTS: dict[tuple, dict] = {}  # rows that shrink to the same model (same fingerprint) share one comparison


def module_parity(model: nn.Module, images: torch.Tensor, mode: str, backends=None,
                  kinds=("attention", "residual", "linear")) -> dict:
    """Every module of ``model`` a fast forward of ``kinds`` covers against timm's, on its input inside ``model``,
    in ``mode`` and each attention backend: {(kind, backend): worst errors}. Modules alike (one fingerprint and
    input shapes: a model's blocks) are compared once; so are models alike."""
    backends = backends or BACKENDS[mode]
    key = (fingerprint(model), tuple(images.shape), mode, backends, kinds)
    if key in _MODEL_RESULTS:
        return _MODEL_RESULTS[key]
    results = {}
    for kind in kinds:
        names = {name for name, _ in swap_forwards(copy.deepcopy(model), FAST_KINDS[kind])}
        # outermost only: an MLP's fc1 / fc2 are compared as part of it
        originals = [m for n, m in model.named_modules() if n in names and n.rpartition(".")[0] not in names]
        captured = captured_inputs(model, images, originals)
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
                worst = results.setdefault((kind, backend), {})
                for name, err in errors.items():
                    worst[name] = max(worst.get(name, 0.0), err)
    _MODEL_RESULTS[key] = results
    return results


def _images(batch: int, size: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- teachers --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", TEACHERS)
def test_teacher_modules_match_timm(name, mode):
    """Each attention, BEiT block and linear / MLP fdfast can swap into a teacher against timm's own."""
    model, size = teacher_template(name)
    module_parity(model.eval(), _images(1, size), mode)


@pytest.mark.parametrize("name", TEACHERS)
def test_modules_without_a_fast_path_stay_timm(name):
    """patch_model / pack_linears / fuse_residuals switch only the modules their fast forward covers; every other
    module keeps timm's class, so its own forward."""
    model = copy.deepcopy(teacher_template(name)[0])
    before = {n: type(m) for n, m in model.named_modules()}
    if any(type(m) in FAST_ATTENTION for m in model.modules()):
        patch_model(model)
    else:  # nothing to patch: a clear error, nothing changed
        with pytest.raises(ValueError, match="no attention module fdfast supports"):
            patch_model(model)
    pack_linears(model)
    fuse_residuals(model)
    fast_of = {timm_class(c): c for kind in FAST_KINDS.values() for c in kind}
    for n, m in model.named_modules():
        fast = fast_of.get(before[n])
        if fast is None:  # no fast path for this class (EVA's and Swin v1's attention, LayerScale, ...)
            assert type(m) is before[n], n
        else:  # switched exactly when its fast forward covers it (a QuickGELU MLP does not)
            assert type(m) is (fast if getattr(fast, "fits", lambda _: True)(m) else before[n]), n


@pytest.mark.parametrize("mode", ["fp32", "bf16-inference"])
@pytest.mark.parametrize("name", TEACHERS)
def test_teacher_as_fdfast_runs_it_matches_timm(name, mode):
    """The whole teacher as ``fdfast train`` runs it (its timm attention patched, backend auto; linears packed):
    the target tokens against timm's."""
    timm_model, size = teacher_template(name)
    timm_model = copy.deepcopy(timm_model).requires_grad_(False)  # frozen, as in training: no gradients
    key = ("teacher", fingerprint(timm_model), size, mode)
    if key not in _MODEL_RESULTS:
        fast = copy.deepcopy(timm_model)
        if any(type(m) in FAST_ATTENTION for m in fast.modules()):
            patch_model(fast)
        pack_linears(fast)
        _MODEL_RESULTS[key] = parity(Tokens(timm_model), {"auto": Tokens(fast)}, (), {"images": _images(1, size)},
                                     mode)


# ---- students --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES[:2])
@pytest.mark.parametrize("name", list(STUDENTS))
def test_student_matches_timm(name, mode):
    """The student as fdfast trains it (build_student(fast=True)) against timm's (fast=False): the whole model in
    train mode with drop path on one seed, tokens and every parameter's gradient, each backend; then module by
    module."""
    cfg = STUDENTS[name]
    torch.manual_seed(0)
    timm_model = randomised(build_student(cfg)).train()
    fast_model = build_student(cfg, fast=True).train()
    fast_model.load_state_dict(timm_model.state_dict(), strict=True)
    images = _images(2, cfg.img_size)
    fasts = {b: Tokens(patch_model(copy.deepcopy(fast_model), backend=b)) for b in BACKENDS[mode]}
    parity(Tokens(timm_model), fasts, (), {"images": images}, mode)
    module_parity(timm_model.eval(), images, mode, kinds=("attention", "residual"))  # what fast=True swaps


def test_drop_path_masks_follow_the_seed():
    """fuse_residuals draws timm's masks: the same seed gives timm's output, another seed another one."""
    torch.manual_seed(0)
    timm_model = randomised(build_student(STUDENTS["shared-rpb"])).train()
    fused = copy.deepcopy(timm_model)
    assert fuse_residuals(fused) == 2
    out = {}
    for key, model, seed in (("timm", timm_model, 5), ("fused", fused, 5), ("other", fused, 6)):
        torch.manual_seed(seed)
        out[key] = model.forward_features(_images(2, 224))
    assert rel_error(out["fused"], out["timm"]) < TOL["fp32"]["out"]
    assert rel_error(out["other"], out["timm"]) > 1e-2  # drop path is on: the masks matter


# ---- Triton, timm options --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TRITON_CASES)
def test_triton_interpreter_matches_timm(name):
    """backend="triton" (the CUDA kernel, here through the interpreter) against timm's attention, fp32."""
    if name in STUDENTS:
        torch.manual_seed(0)
        model, size = randomised(build_student(STUDENTS[name])), STUDENTS[name].img_size
    else:
        model, size = teacher_template(name)
    results = module_parity(model.eval(), _images(1, size), "fp32", backends=("triton",))
    assert ("attention", "triton") in results


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(MODULES))
def test_timm_attention_options_match_timm(name, mode):
    build, inputs = MODULES[name]
    torch.manual_seed(0)
    module = randomised(build()).eval()
    args, kwargs = inputs(torch.Generator().manual_seed(4))
    parity(module, {b: swap(module, "attention", b) for b in BACKENDS[mode]}, args, kwargs, mode)


# ---- known deviations, pinned ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", [
    "sdpa", "reference",
    pytest.param("auto", marks=pytest.mark.xfail(strict=True, reason=CPU_BF16_SWINV2))])
def test_known_deviations_are_real(backend):
    """SwinV2's logit-scale and CPB-MLP gradients in bf16 (the student's plain and shifted windows), error over
    timm's own bf16 error, averaged over 6 seeds: at most 1.5x (one seed's ratio is a noisy sample)."""
    keys, probes = ("logit_scale", "cpb_mlp.2.weight"), PROBES["bf16-autocast"]
    ratios = {(block, key): [] for block in (0, 1) for key in keys}
    for seed in range(6):
        torch.manual_seed(seed)
        model = randomised(build_student(STUDENTS["swinv2"]), seed=seed).eval()
        images = _images(2, 56, seed=100 + seed)
        for block in (0, 1):
            attn = model.layers[0].blocks[block].attn
            args, kwargs = captured_inputs(model, images, [attn])[id(attn)]
            ref = run(attn, args, kwargs, "fp32", probes)[1]
            timm_errors = grad_errors(run(attn, args, kwargs, "bf16-autocast", probes)[1], ref)
            errors = grad_errors(run(swap(attn, "attention", backend), args, kwargs, "bf16-autocast", probes)[1], ref)
            for key in keys:
                ratios[block, key].append(errors[key] / timm_errors[key])
    means = {k: sum(v) / len(v) for k, v in ratios.items()}
    assert max(means.values()) <= 1.5, means
