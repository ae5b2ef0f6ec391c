"""Loss landscape slices along filter-normalised random directions (Li et al., 2018, "Visualizing the
Loss Landscape of Neural Nets"), and the losses to slice: cross-entropy, the FD training objective (the
distiller itself), a label-free proxy.

A slice evaluates ``loss_fn(model)`` at ``w + a*d1 (+ b*d2)`` on a grid of (a, b), then puts the weights
back exactly. Each direction has, for every filter (row along dim 0 of a weight with >= 2 dims), the norm
of that filter in ``w``; 1-D parameters (biases, norms) are left still, as in the paper ("ignore biasbn").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fdfast.models import tokens


def filter_normalized_direction(model: nn.Module, generator: torch.Generator | None = None,
                                include_1d: bool = False) -> dict[str, torch.Tensor]:
    """A random direction {param name: tensor}: Gaussian, each filter rescaled to its weight filter's norm.

    ``include_1d``: also move 1-D parameters, each rescaled as one filter (default: zero, as Li et al.).
    """
    direction = {}
    for name, w in model.named_parameters():
        d = torch.randn(w.shape, generator=generator, dtype=torch.float32).to(device=w.device, dtype=w.dtype)
        if w.dim() <= 1:
            if not include_1d:
                d.zero_()
            else:
                d.mul_(w.norm() / (d.norm() + 1e-10))
        else:
            w_norm = w.detach().flatten(1).norm(dim=1)  # [filters]
            d_norm = d.flatten(1).norm(dim=1)
            scale = (w_norm / (d_norm + 1e-10)).view(-1, *([1] * (w.dim() - 1)))
            d.mul_(scale)
        direction[name] = d
    return direction


@torch.no_grad()
def evaluate_slice(model: nn.Module, loss_fn, directions: list[dict], coords: list[tuple[float, ...]],
                   progress: bool = True, desc: str = "loss landscape") -> list[float]:
    """loss_fn(model) at w + sum_i c_i * d_i for every c in coords; the weights are restored afterwards."""
    from tqdm.auto import tqdm

    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    centre = [p.detach().clone() for p in params]
    steps = [[d[n] for n in names] for d in directions]
    losses = []
    try:
        for c in tqdm(coords, desc=desc, disable=not progress, leave=False):
            torch._foreach_copy_(params, centre)  # one fused op per point, not one per tensor
            for ci, d in zip(c, steps):
                if ci:
                    torch._foreach_add_(params, d, alpha=ci)
            losses.append(float(loss_fn(model)))
    finally:
        torch._foreach_copy_(params, centre)
    return losses


def landscape_1d(model: nn.Module, loss_fn, steps: int = 21, span: float = 1.0, direction: dict | None = None,
                 seed: int = 0, progress: bool = True) -> dict:
    """Loss along one filter-normalised direction: {"alphas": [steps], "losses": [steps]} on [-span, span]."""
    if direction is None:
        direction = filter_normalized_direction(model, torch.Generator().manual_seed(seed))
    alphas = torch.linspace(-span, span, steps).tolist()
    losses = evaluate_slice(model, loss_fn, [direction], [(a,) for a in alphas], progress, "landscape 1-D")
    return {"alphas": alphas, "losses": losses, "seed": seed, "span": span}


def landscape_2d(model: nn.Module, loss_fn, steps: int = 11, span: float = 1.0,
                 directions: tuple[dict, dict] | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Loss on the plane of two directions: {"alphas", "betas": [steps], "losses": [steps(beta)][steps(alpha)]}."""
    if directions is None:
        g = torch.Generator().manual_seed(seed)
        directions = (filter_normalized_direction(model, g), filter_normalized_direction(model, g))
    axis = torch.linspace(-span, span, steps).tolist()
    coords = [(a, b) for b in axis for a in axis]
    flat = evaluate_slice(model, loss_fn, list(directions), coords, progress, "landscape 2-D")
    losses = [flat[i * steps:(i + 1) * steps] for i in range(steps)]
    return {"alphas": axis, "betas": axis, "losses": losses, "seed": seed, "span": span}


def curvature_1d(alphas, losses) -> float:
    """Second derivative d2L/da2 of the least-squares parabola through a 1-D slice (sharpness of the basin)."""
    a = torch.as_tensor(alphas, dtype=torch.float64)
    y = torch.as_tensor(losses, dtype=torch.float64)
    design = torch.stack([a * a, a, torch.ones_like(a)], dim=1)
    coef = torch.linalg.lstsq(design, y[:, None]).solution[:, 0]
    return float(2 * coef[0])


# ---- losses: each returns loss_fn(model) -> scalar tensor, evaluated in chunks of `batch_size` images ----

def _chunks(n: int, batch_size: int | None):
    step = batch_size or n
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def cross_entropy_loss(images: torch.Tensor, labels: torch.Tensor, batch_size: int | None = None):
    """Fine-tuning cross-entropy of a classifier on labelled images (model(images) -> logits)."""
    def loss_fn(model):
        total = sum(F.cross_entropy(model(images[i:j]), labels[i:j], reduction="sum")
                    for i, j in _chunks(len(images), batch_size))
        return total / len(images)
    return loss_fn


def _whiten(t: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(t.float(), t.shape[-1:], eps=eps)


def _smooth_l1(diff: torch.Tensor, beta: float) -> torch.Tensor:
    return F.smooth_l1_loss(diff, torch.zeros_like(diff), beta=beta, reduction="none") if beta else diff.abs()


@torch.no_grad()
def fit_projection(student: torch.Tensor, target: torch.Tensor, ridge: float = 1e-2
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge least squares (W [Ct, Cs], b [Ct]) with student @ W^T + b ~ target; tokens as [..., C]."""
    s = student.reshape(-1, student.shape[-1]).double()
    t = target.reshape(-1, target.shape[-1]).double()
    s_mean, t_mean = s.mean(0), t.mean(0)
    sc, tc = s - s_mean, t - t_mean
    gram = sc.T @ sc
    gram += ridge * gram.diagonal().mean().clamp_min(1e-12) * torch.eye(gram.shape[0], dtype=gram.dtype)
    weight = torch.linalg.solve(gram, sc.T @ tc).T  # [Ct, Cs]
    bias = t_mean - weight @ s_mean
    return weight.float(), bias.float()


def fd_loss(images: torch.Tensor, teacher: nn.Module, model_at_centre: nn.Module, *,
            teacher_images: torch.Tensor | None = None, projection=None, loss_cfg=None, align: str = "bilinear",
            batch_size: int | None = None):
    """The training objective itself: ``fdfast.distill.FeatureDistiller`` (align_tokens + fdfast's fd_loss).

    teacher: an fdfast Teacher (or any module with ``grid``, ``num_prefix_tokens``, ``dim``); its targets are
    computed once from ``teacher_images`` (its own view of the same images; default ``images``).
    ``projection`` (W [Ct, Cs], b [Ct] or None): the trained 1x1 projection; None fits it by ridge least squares
    to the model at the centre (aligned tokens vs whitened targets), so every model is scored with its best
    linear read-out. ``loss_cfg``: fdfast.config.LossConfig (default: the training default).
    """
    from fdfast.config import LossConfig
    from fdfast.distill import FeatureDistiller
    loss_cfg = loss_cfg or LossConfig()
    device = images.device
    distiller = FeatureDistiller(model_at_centre, teacher, loss_cfg, align).to(device)
    chunks = _chunks(len(images), batch_size)
    t_images = images if teacher_images is None else teacher_images
    with torch.no_grad():
        targets = [distiller.target_tokens(t_images[i:j]) for i, j in chunks]  # [b, Nt, Ct] each
        if projection is None:
            pairs = [distiller.aligned_tokens(images[i:j], t) for (i, j), t in zip(chunks, targets)]
            pred = torch.cat([p for p, _ in pairs])
            target = torch.cat([_whiten(t, loss_cfg.eps) if loss_cfg.whiten else t.float() for _, t in pairs])
            projection = fit_projection(pred, target)
            fit_tokens = pred.shape[0] * pred.shape[1]
        else:
            fit_tokens = None
        weight, bias = projection
        distiller.fd_loss.proj.weight.copy_(weight)
        distiller.fd_loss.proj.bias.copy_(bias if bias is not None else torch.zeros_like(distiller.fd_loss.proj.bias))

    def loss_fn(model):
        if model is not distiller.student:
            raise ValueError("fd_loss(...) scores the model it was built for (model_at_centre)")
        # chunks weighted by their share of the images: the mean over all tokens, as one batch would give
        return sum(distiller(images[i:j], t) * ((j - i) / len(images)) for (i, j), t in zip(chunks, targets))
    loss_fn.fit_tokens, loss_fn.fit_channels = fit_tokens, int(weight.shape[1])
    return loss_fn


def representation_drift_loss(images: torch.Tensor, model_at_centre: nn.Module, beta: float = 2.0,
                              eps: float = 1e-5, batch_size: int | None = None):
    """Label-free proxy: FD's loss with the model at the centre as its own teacher.

    mean smooth_l1_beta(LN(S_w) - LN(S_w0)) over patch tokens: zero at the centre by construction, it
    grows as fast as the representation changes along the slice, so two models' basins compare directly
    without labels, a classifier head or a teacher.
    """
    def patches(model, x):  # [B, h, w, C] patch tokens after the final norm
        return tokens.patch_map(tokens.final_tokens(model, x), tokens.geometry(model, x.shape[-2:]))

    with torch.no_grad():
        target = torch.cat([_whiten(patches(model_at_centre, images[i:j]), eps)
                            for i, j in _chunks(len(images), batch_size)])

    def loss_fn(model):
        total = 0.0
        for i, j in _chunks(len(images), batch_size):
            total = total + _smooth_l1(_whiten(patches(model, images[i:j]), eps) - target[i:j], beta).sum()
        return total / target.numel()
    return loss_fn
