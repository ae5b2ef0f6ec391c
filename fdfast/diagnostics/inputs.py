"""What `fdfast diagnose` looks at: a model from a run / checkpoint / exported file / `teacher:NAME[@WEIGHTS]`,
the run's teacher (for the FD loss), and deterministic evaluation images (resize + centre crop)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN, IMAGENET_DEFAULT_STD as IMAGENET_STD
from torch import nn

from fdfast.errors import FDFastError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class ModelUnderTest:
    """A timm model to diagnose, with how to feed it and (for a run) the teacher it was distilled from."""
    label: str
    model: nn.Module  # the timm model itself (eval mode)
    image_size: tuple[int, int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    teacher: dict | None = None  # run config's teacher section: {"name", "weights", "img_size"}
    source: str = ""
    extra: dict = field(default_factory=dict)


def timm_model(module: nn.Module) -> nn.Module:
    """The timm model inside a wrapper (fdfast's Teacher keeps it as ``backbone``), or the module itself."""
    if hasattr(module, "forward_features") and hasattr(module, "patch_embed"):
        return module
    for attr in ("backbone", "model", "trunk", "timm_model", "net"):
        inner = getattr(module, attr, None)
        if isinstance(inner, nn.Module) and inner is not module:
            return timm_model(inner)
    return module


def model_image_size(model: nn.Module, default: int = 224) -> tuple[int, int]:
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None:
        return (default, default)
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def find_run_config(path: Path) -> dict | None:
    """The resolved config.yaml of the run that holds ``path``: the run dir itself, the folder of a file,
    or the run above a ``checkpoints/step-N`` directory (never an unrelated folder further up)."""
    import yaml
    path = path.resolve()
    folder = path if path.is_dir() else path.parent
    candidates = [folder] + [p.parent for p in folder.parents if p.name == "checkpoints"][:1]
    for run in candidates:
        cfg = run / "config.yaml"
        if cfg.is_file():
            try:
                return yaml.safe_load(cfg.read_text()) or {}
            except yaml.YAMLError as e:
                raise FDFastError(f"{cfg} is not valid YAML: {e}") from None
    return None


def _safetensors_metadata(path: Path) -> dict:
    if not (path.is_file() and path.suffix == ".safetensors"):
        return {}
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise FDFastError(f"{path} is not a readable safetensors file: {e}") from None


def _load_student(path: Path) -> nn.Module:
    """A run / checkpoint / student file or a `fdfast export --to timm` file (all read by fdfast.load_student)."""
    from fdfast.models.export import load_student
    _safetensors_metadata(path)  # a damaged file gets a one-line error here
    return timm_model(load_student(path))


def load_model_under_test(spec: str, image_size: int | None = None, device: str = "cpu") -> ModelUnderTest:
    """MODEL argument -> ModelUnderTest. ``teacher:NAME[@WEIGHTS]`` builds a registry / timm teacher, a timm model
    folder (``local-dir:DIR``, ``hf-hub:ORG/NAME``) the model it holds."""
    from fdfast.models.teachers import MODEL_FOLDERS, TEACHER_SPEC, build_teacher, parse_teacher_spec
    if spec.startswith((TEACHER_SPEC, *MODEL_FOLDERS)):  # a registry / timm teacher, or a timm model folder
        name, weights = parse_teacher_spec(spec) if spec.startswith(TEACHER_SPEC) else (spec, None)
        teacher = build_teacher(name, weights=weights, img_size=image_size)
        model = timm_model(teacher).to(device).eval()
        mean, std = getattr(teacher, "mean", IMAGENET_MEAN), getattr(teacher, "std", IMAGENET_STD)
        return ModelUnderTest(label=f"teacher {name}", model=model, image_size=model_image_size(model),
                              mean=tuple(mean), std=tuple(std), source=spec)
    path = Path(spec)
    if not path.exists():
        raise FDFastError(f"MODEL {spec!r} is neither an existing run directory / checkpoint / exported file, "
                          "teacher:NAME[@WEIGHTS], nor a timm model folder (local-dir:DIR, hf-hub:ORG/NAME)")
    model = _load_student(path).to(device).eval()
    run_cfg = find_run_config(path) or {}
    teacher = run_cfg.get("teacher") if isinstance(run_cfg.get("teacher"), dict) else None
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if teacher and teacher.get("name"):
        mean, std = _teacher_norm(teacher["name"])  # FD students are trained on the teacher's normalisation
    label = path.resolve().name if path.is_dir() else path.stem
    mut = ModelUnderTest(label=f"student {label}", model=model, image_size=model_image_size(model),
                         mean=mean, std=std, teacher=teacher, source=str(path))
    found = trained_projection(path, model)
    if found is not None:
        mut.extra["projection"], mut.extra["projection_source"] = found
    return mut


def trained_projection(path: Path, model: nn.Module):
    """((W [Ct, Cs], b [Ct]), file) of the FD projection trained with exactly these student weights, or None.

    Checkpoints store the student ("student.*") beside the projection ("proj.*"); the projection is only
    used when the checkpoint's student equals the loaded one (a final student.safetensors written after
    the last checkpoint has no projection of its own).
    """
    from safetensors.torch import load_file
    if path.is_dir():
        file = path / "model.safetensors"
        if not file.is_file():
            from fdfast.checkpoint import latest_committed
            latest = latest_committed(path)
            file = latest / "model.safetensors" if latest is not None else None
    else:
        file = path if path.suffix == ".safetensors" else None
    if file is None or not file.is_file():
        return None
    tensors = load_file(str(file))
    if "proj.weight" not in tensors:
        return None
    from fdfast.distill import split_trainable
    student, _ = split_trainable(tensors)
    own = model.state_dict()
    if set(student) != set(own) or any(not torch.equal(student[k], own[k].detach().cpu()) for k in own):
        return None
    return (tensors["proj.weight"].float(), tensors.get("proj.bias")), str(file)


def _teacher_norm(name: str):
    try:
        from fdfast.models.teachers import get_entry
        norm = get_entry(name).norm
        return tuple(norm[0]), tuple(norm[1])
    except Exception:  # an unknown or broken registry entry only costs the exact normalisation
        return IMAGENET_MEAN, IMAGENET_STD


def image_paths(data: str | None, count: int) -> list[Path]:
    """The first ``count`` images (sorted, recursive) of --data, or of the default data source (the demo photos)."""
    if data is None:
        from fdfast.data.sources import source_dir
        root = source_dir()
    else:
        root = Path(data)
        if not root.is_dir():
            raise FDFastError(f"--data {data!r} is not a directory of images")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise FDFastError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {root}")
    return paths[:count]


def load_images(paths: list[Path], size: tuple[int, int]):
    """Deterministic eval view: shorter side resized to the crop size (bicubic), centre crop -> uint8 RGB."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError
    from fdfast.data.files import load_rgb
    from torchvision.transforms import functional as TF

    out = []
    for p in paths:
        try:
            img = load_rgb(p)  # as the loaders decode it (16-bit grey scaled, not clipped)
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
            raise FDFastError(f"cannot read image {p}: {e}; remove it from --data") from None
        img = TF.resize(img, max(size), interpolation=TF.InterpolationMode.BICUBIC)
        out.append(np.asarray(TF.center_crop(img, list(size))))
    return out


def to_tensor(images, mean, std) -> torch.Tensor:
    """uint8 [H, W, 3] arrays -> normalised float [B, 3, H, W]."""
    import numpy as np
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
