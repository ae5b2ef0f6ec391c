"""fdfast's forwards for timm modules: the one way they are swapped in, and the eager CPU fast paths.

The swap. timm builds every model fdfast runs, the student too: timm's ``Beit`` and ``SwinTransformerV2``
construct their blocks and attention by name (no ``block_fn`` / ``attn_layer`` argument), so fdfast could only
hand them its classes at construction by copying their ``__init__``, a fork of timm. Instead a module's class
becomes a subclass of its exact timm class that overrides ``forward`` only; ``fast_forward`` checks that when
the subclass is defined (one base, nothing but ``forward`` / ``fits`` / a backend default), so parameters,
buffers, their names and state dicts stay timm's and load strictly into the unswitched classes.
``swap_forwards`` switches the modules of a model whose configuration the subclass covers (its ``fits``); every
other module keeps timm's class and forward, so it cannot run other math. ``timm_forward`` switches modules back
to timm's forward for a block of code (diagnostics read timm's explicit softmax). ``fdfast.patch_model``
(attention), ``pack_linears`` and ``fuse_residuals`` below all go through it.

The CPU fast paths:
- ``pack_linears(model)``: ``nn.Linear`` -> ``PackedLinear`` and timm ``Mlp`` -> ``PackedMlp`` run on
  ``fdfast.kernels.cpu_linear.linear``: oneDNN-packed bf16 weights for frozen layers on a native-bf16 CPU (the
  teacher), fc1 + GELU as one GEMM there; ``F.linear`` itself everywhere else.
- ``fuse_residuals(model)``: timm BEiT blocks with layer scale (the FD student) add each branch as
  ``torch.addcmul(x, gamma * keep_mask, branch)``: one op for layer scale, drop path and the residual add instead
  of three. The drop-path mask is drawn exactly as timm's ``DropPath`` draws it (same shape, dtype and RNG
  calls), so runs stay reproducible.
tests/test_timm_parity.py compares each with timm's own module for every variant the teacher registry and the
student builder produce.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from timm.layers.activations import GELU, GELUTanh
from timm.layers.drop import DropPath
from timm.layers.mlp import Mlp
from timm.models.beit import Block as BeitBlock
from torch import nn

from fdfast.kernels.cpu_linear import linear

# ---- the swap ----------------------------------------------------------------------------------------------

# what a forward-only subclass may define: its forward, the static check of what it covers, a class-level backend
# default, and what Python itself puts into a class body
_FORWARD_ONLY = {"forward", "fits", "fdfast_backend", "__module__", "__qualname__", "__doc__", "__annotations__",
                 "__firstlineno__", "__static_attributes__"}
_TIMM_CLASS: dict[type, type] = {}  # fdfast subclass -> the timm class whose forward it replaces


def fast_forward(cls: type) -> type:
    """Class decorator: register ``cls`` as fdfast's forward for its one base class (a timm module class).

    Raises TypeError when ``cls`` has several bases or defines more than ``forward``, ``fits`` (a staticmethod
    ``fits(module) -> bool``: the module's configuration is one the forward covers) and ``fdfast_backend``.
    """
    if len(cls.__bases__) != 1 or not issubclass(cls.__bases__[0], nn.Module):
        raise TypeError(f"{cls.__name__}: a fast forward subclasses exactly one nn.Module class, "
                        f"got bases {cls.__bases__}")
    extra = sorted(set(vars(cls)) - _FORWARD_ONLY)
    if extra:
        raise TypeError(f"{cls.__name__} may override forward only (and fits / fdfast_backend), it also defines "
                        f"{extra}: state or construction of its own would leave timm's state dict behind")
    _TIMM_CLASS[cls] = cls.__bases__[0]
    return cls


def timm_class(cls: type) -> type:
    """The timm class a ``fast_forward`` subclass runs in place of; any other class is returned as it is."""
    return _TIMM_CLASS.get(cls, cls)


def swap_forwards(model: nn.Module, fast_classes: Iterable[type]) -> list[tuple[str, nn.Module]]:
    """Switch each module of ``model`` (itself included) whose exact class is the timm class of one of
    ``fast_classes`` and which that class ``fits`` to it, in place; returns the (name, module) pairs switched.

    Exact classes only: a subclass of a timm class (timm's or a user's) may change what forward means.
    """
    table = {}
    for fast in fast_classes:
        if fast not in _TIMM_CLASS:
            raise TypeError(f"{fast.__name__} is not registered with fdfast.fastpath.fast_forward")
        table[_TIMM_CLASS[fast]] = fast
    switched = []
    for name, module in model.named_modules():
        fast = table.get(type(module))
        if fast is not None and (not hasattr(fast, "fits") or fast.fits(module)):
            module.__class__ = fast
            switched.append((name, module))
    return switched


@contextlib.contextmanager
def timm_forward(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Inside the block the given modules run their timm class's own forward; their fdfast classes come back on
    the way out, after an error too."""
    switched = [(m, type(m)) for m in modules if timm_class(type(m)) is not type(m)]
    for module, cls in switched:
        module.__class__ = timm_class(cls)
    try:
        yield
    finally:
        for module, cls in switched:
            module.__class__ = cls


# ---- packed linears (the frozen teacher) ----------------------------------------------------------------------

@fast_forward
class PackedLinear(nn.Linear):
    """``nn.Linear`` whose forward is ``cpu_linear.linear``: packed bf16 on a native-bf16 CPU, else F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def gelu_kind(act: nn.Module) -> str | None:
    """"gelu" / "gelu_tanh" for the GELU modules timm builds, None for any other activation."""
    if type(act) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    return {GELU: "gelu", GELUTanh: "gelu_tanh"}.get(type(act))


@fast_forward
class PackedMlp(Mlp):
    """timm ``Mlp`` with fc1 + GELU as one ``linear`` call (fused where no gradient is needed); timm's own forward
    while hidden dropout is active."""

    @staticmethod
    def fits(mlp: Mlp) -> bool:
        """A GELU MLP on linear layers without a hidden norm (not QuickGELU / SiLU, not 1x1 convolutions)."""
        return (gelu_kind(mlp.act) is not None and isinstance(mlp.norm, nn.Identity)
                and isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.drop1.p > 0:
            return super().forward(x)
        return self.drop2(self.fc2(linear(x, self.fc1.weight, self.fc1.bias, act=gelu_kind(self.act))))


def pack_linears(model: nn.Module) -> int:
    """Run ``model``'s ``nn.Linear`` and GELU ``Mlp`` modules (exact types) on ``cpu_linear.linear``, in place;
    returns how many modules changed (0 when called again)."""
    return len(swap_forwards(model, (PackedLinear, PackedMlp)))


# ---- fused residuals (the student) ----------------------------------------------------------------------------

def _residual(x: torch.Tensor, gamma: torch.Tensor, drop_path: nn.Module, branch: torch.Tensor) -> torch.Tensor:
    """x + drop_path(gamma * branch) as one addcmul; the mask drawn as ``timm.layers.drop.drop_path`` draws it."""
    scale = gamma
    if isinstance(drop_path, DropPath) and drop_path.training and drop_path.drop_prob > 0:
        keep = 1 - drop_path.drop_prob
        # timm: (gamma * branch).new_empty(...): gamma * branch has x's dtype (fp32 gamma, fp32 or bf16 branch)
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        if keep > 0 and drop_path.scale_by_keep:
            mask.div_(keep)
        scale = gamma * mask
    return torch.addcmul(x, scale, branch)


@fast_forward
class FusedResidualBlock(BeitBlock):
    """timm BEiT ``Block`` with layer scale, drop path and residual add fused per branch (``_residual``)."""

    @staticmethod
    def fits(block: BeitBlock) -> bool:
        """Layer scale on (without it there is nothing to fuse), drop paths timm's ``DropPath`` or Identity."""
        return block.gamma_1 is not None and all(type(d) in (DropPath, nn.Identity)
                                                 for d in (block.drop_path1, block.drop_path2))

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.gamma_1.dtype != x.dtype:  # timm draws the mask in gamma * branch's dtype: another dtype here
            return super().forward(x, shared_rel_pos_bias=shared_rel_pos_bias)
        x = _residual(x, self.gamma_1, self.drop_path1,
                      self.attn(self.norm1(x), shared_rel_pos_bias=shared_rel_pos_bias))
        return _residual(x, self.gamma_2, self.drop_path2, self.mlp(self.norm2(x)))


def fuse_residuals(model: nn.Module) -> int:
    """Switch ``model``'s timm BEiT blocks with layer scale (exact type) to ``FusedResidualBlock``, in place;
    returns how many changed (0 when called again)."""
    return len(swap_forwards(model, (FusedResidualBlock,)))
