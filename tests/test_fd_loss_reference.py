"""FDLoss / fdfast.functional.fd_loss (reference backend) equal the paper's formula, values and gradients."""
import pytest
import torch

import fdfast
from fdfast.functional import fd_loss


def formula(s, t, w, b, beta, eps, whiten):
    """The objective written out element by element (METHOD.md), independent of kernels/reference.py."""
    pred = s @ w.T + (b if b is not None else 0)
    if whiten:
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        t = (t - mu) / torch.sqrt(var + eps)
    d = (pred - t).abs()
    per = torch.where(d < beta, 0.5 * d**2 / beta, d - 0.5 * beta) if beta > 0 else d
    return per.sum() / per.numel()


SHAPES = [(1, 197, 24, 40), (2, 49, 33, 17), (3, 1, 8, 8), (1, 65, 192, 384)]


@pytest.mark.parametrize("B,N,Cs,Ct", SHAPES)
@pytest.mark.parametrize("beta,whiten", [(2.0, True), (0.5, True), (1.0, False), (0.0, True)])
def test_fdloss_matches_formula_fp64(B, N, Cs, Ct, beta, whiten):
    s = torch.randn(B, N, Cs, dtype=torch.float64, requires_grad=True)
    t = torch.randn(B, N, Ct, dtype=torch.float64) * 3 + 1
    mod = fdfast.FDLoss(Cs, Ct, beta=beta, whiten=whiten, backend="reference").double()
    got = mod(s, t)
    got.backward()
    grads = [s.grad.clone(), mod.proj.weight.grad.clone(), mod.proj.bias.grad.clone()]

    s2 = s.detach().clone().requires_grad_()
    w2 = mod.proj.weight.detach().clone().requires_grad_()
    b2 = mod.proj.bias.detach().clone().requires_grad_()
    want = formula(s2, t, w2, b2, beta, 1e-5, whiten)
    want.backward()
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    for g, w in zip(grads, [s2.grad, w2.grad, b2.grad]):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-14)


def test_functional_without_bias_and_gradcheck():
    s = torch.randn(1, 5, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randn(1, 5, 7, dtype=torch.float64)
    w = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, w: fd_loss(s, t, w, None, backend="reference"), (s, w))
    torch.testing.assert_close(fd_loss(s, t, w, backend="reference"), formula(s, t, w, None, 2.0, 1e-5, True))


def test_teacher_gets_no_gradient():
    s = torch.randn(2, 4, 8, requires_grad=True)
    t = torch.randn(2, 4, 8, requires_grad=True)
    w = torch.randn(8, 8)
    fd_loss(s, t, w, backend="reference").backward()
    assert t.grad is None


def test_fdloss_proj_is_a_linear_and_defaults_are_the_papers():
    mod = fdfast.FDLoss(192, 384)
    assert isinstance(mod.proj, torch.nn.Linear) and mod.proj.weight.shape == (384, 192)
    assert (mod.beta, mod.eps, mod.whiten) == (2.0, 1e-5, True)


@pytest.mark.parametrize("s_shape,t_shape,w_shape,match", [
    ((2, 5, 4), (2, 6, 4), (4, 4), "disagree on"),
    ((5, 4), (5, 4), (4, 4), "expects"),
    ((2, 5, 4), (2, 5, 3), (4, 4), "weight must be"),
])
def test_bad_shapes_are_named(s_shape, t_shape, w_shape, match):
    with pytest.raises(ValueError, match=match):
        fd_loss(torch.randn(s_shape), torch.randn(t_shape), torch.randn(w_shape), backend="reference")


def test_integer_inputs_and_unknown_backend_rejected():
    with pytest.raises(ValueError, match="floating-point"):
        fd_loss(torch.ones(1, 2, 3, dtype=torch.long), torch.randn(1, 2, 3), torch.randn(3, 3))
    with pytest.raises(ValueError, match="unknown backend"):
        fd_loss(torch.randn(1, 2, 3), torch.randn(1, 2, 3), torch.randn(3, 3), backend="cuda")


def kind_formula(s, t, w, b, kind, eps=1e-5):
    """Issue 16's definitions written out: l2 = mean over B*N*C of (pred - target)^2; cosine = mean over B*N of
    1 - <pred, target> / (|pred| |target|); target = the whitened teacher tokens."""
    pred = s @ w.T + b
    mu = t.mean(-1, keepdim=True)
    target = (t - mu) / torch.sqrt(((t - mu) ** 2).mean(-1, keepdim=True) + eps)
    if kind == "l2":
        return ((pred - target) ** 2).sum() / pred.numel()
    cos = (pred * target).sum(-1) / (pred.norm(dim=-1) * target.norm(dim=-1))
    return (1 - cos).sum() / cos.numel()


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("kind", ["l2", "cosine"])
def test_loss_kinds_match_their_formula_fp64(kind, backend):
    s = torch.randn(2, 49, 33, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 49, 17, dtype=torch.float64) * 3 + 1
    mod = fdfast.FDLoss(33, 17, kind=kind, backend=backend).double()
    got = mod(s, t)
    got.backward()
    s2, w2, b2 = (x.detach().clone().requires_grad_() for x in (s, mod.proj.weight, mod.proj.bias))
    want = kind_formula(s2, t, w2, b2, kind)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    for g, w in zip([s.grad, mod.proj.weight.grad, mod.proj.bias.grad], [s2.grad, w2.grad, b2.grad]):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-14)
    assert torch.autograd.gradcheck(lambda s_, w_: fd_loss(s_, t[:1, :4], w_, None, kind=kind, backend=backend),
                                    (s[:1, :4].detach().requires_grad_(), w2.detach().requires_grad_()))
