"""Heterogeneous pairs: the teacher map resized to the student grid, CLS kept only when both have one."""
import pytest
import torch
import torch.nn.functional as F

from fdfast.errors import FDFastError
from fdfast.models.align import align_tokens, check_alignment


def grid_tokens(values, prefix=()):
    """[1, len(prefix) + h*w, 1] tokens from a [h, w] map (row-major, as ViT/Swin/CNN flatten)."""
    v = torch.as_tensor(values, dtype=torch.float32)
    patch = v.flatten()[None, :, None]
    cls = torch.tensor(prefix, dtype=torch.float32).reshape(1, -1, 1)
    return torch.cat([cls, patch], 1)


def test_same_layout_is_untouched():
    s, t = torch.randn(2, 197, 8), torch.randn(2, 197, 16)
    a, b = align_tokens(s, t, (14, 14), 1, (14, 14), 1)
    assert a is s and b is t


def test_area_downsampling_averages_blocks_and_keeps_cls():
    teacher = grid_tokens([[0, 2, 4, 6], [2, 4, 6, 8], [10, 10, 0, 0], [10, 10, 0, 0]], prefix=[-1.0])
    student = torch.zeros(1, 1 + 4, 3)
    s, t = align_tokens(student, teacher, (2, 2), 1, (4, 4), 1, mode="area")
    assert s.shape == (1, 5, 3)
    assert t[0, :, 0].tolist() == [-1.0, 2.0, 6.0, 10.0, 0.0]  # CLS, then 2x2 block means, row-major


def test_upsampling_keeps_row_major_order():
    teacher = grid_tokens([[0, 1], [2, 3]])  # a CNN map: no CLS
    s, t = align_tokens(torch.zeros(1, 1 + 16, 4), teacher, (4, 4), 1, (2, 2), 0, mode="area")
    assert s.shape == (1, 16, 4)  # the student's CLS has no target: dropped
    assert t[0, :, 0].reshape(4, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


def test_bilinear_matches_interpolate_and_preserves_constants():
    torch.manual_seed(0)
    tmap = torch.randn(2, 16, 16, 5)  # CLIP L/14 at 224: 16x16 -> a /16 student's 14x14
    teacher = torch.cat([torch.randn(2, 1, 5), tmap.flatten(1, 2)], 1)
    s, t = align_tokens(torch.randn(2, 197, 7), teacher, (14, 14), 1, (16, 16), 1)
    want = F.interpolate(tmap.permute(0, 3, 1, 2), size=(14, 14), mode="bilinear", align_corners=False,
                         antialias=True).flatten(2).transpose(1, 2)
    assert s.shape == (2, 197, 7) and t.shape == (2, 197, 5)
    assert torch.allclose(t[:, 1:], want) and torch.equal(t[:, :1], teacher[:, :1])
    const = torch.full((1, 49, 3), 2.5)  # Swin 7x7 -> ViT 14x14: a constant map stays constant
    _, t = align_tokens(torch.zeros(1, 197, 3), const, (14, 14), 1, (7, 7), 0)
    assert t.shape == (1, 196, 3) and torch.allclose(t, torch.full_like(t, 2.5))


def test_swin_student_drops_teacher_cls_and_registers():
    teacher = torch.randn(1, 5 + 16, 4)  # DINOv2-reg: CLS + 4 registers + 4x4
    s, t = align_tokens(torch.randn(1, 16, 4), teacher, (4, 4), 0, (4, 4), 5)
    assert t.shape == (1, 16, 4) and torch.equal(t, teacher[:, 5:])
    s, t = align_tokens(torch.randn(1, 17, 4), teacher, (4, 4), 1, (4, 4), 5)  # ViT student: CLS kept
    assert torch.equal(t, torch.cat([teacher[:, :1], teacher[:, 5:]], 1)) and s.shape == (1, 17, 4)


def test_impossible_alignments_raise_before_training():
    with pytest.raises(FDFastError, match="teacher.align"):
        check_alignment((14, 14), 1, (7, 7), 0, mode="nearest")
    with pytest.raises(FDFastError, match="no 2-D token grid"):
        check_alignment((14, 14), 1, None, 0)
    with pytest.raises(FDFastError, match="no 2-D token grid"):
        check_alignment((14, 14), 1, (0, 7), 0)
    with pytest.raises(FDFastError, match=r"teacher tokens \(1, 50, 4\) do not match its grid 7x7 \+ 0"):
        align_tokens(torch.zeros(1, 197, 4), torch.zeros(1, 50, 4), (14, 14), 1, (7, 7), 0)
