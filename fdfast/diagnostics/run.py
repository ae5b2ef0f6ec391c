"""The diagnose pipeline: models + images -> attention statistics, loss landscape -> JSON, PNG, report.html."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from fdfast.diagnostics import landscape as ls
from fdfast.diagnostics import plots
from fdfast.diagnostics.attention import attention_distance, capture_attention, distance_spread, head_similarity
from fdfast.diagnostics.inputs import ModelUnderTest, load_images, to_tensor
from fdfast.errors import FDFastError


@torch.no_grad()
def attention_statistics(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 8,
                         query: tuple[int, int] | None = None) -> dict:
    """Per layer over all images: head distances (px), head similarity, spread; and the maps to plot:
    the query patch's attention in image 0 ([H, rows, cols]) and the mean patch-to-patch map ([H, M, M]).
    Window attention (Swin) is read in window coordinates (image 0's first window for the query map).
    """
    n = len(images)
    layers = None
    for i in range(0, n, batch_size):
        _, maps = capture_attention(model, images[i:i + batch_size])
        count = min(batch_size, n - i)
        if layers is None:
            layers = [{"name": m.name, "grid": list(m.grid), "patch_size": list(m.patch_size),
                       "num_prefix_tokens": m.num_prefix_tokens, "windows": m.windows, "windowed": m.windowed,
                       "distance_sum": 0.0, "similarity_sum": 0.0, "full_sum": 0.0, "maps_seen": 0} for m in maps]
            rows, cols = maps[0].grid
            q = query or (rows // 2, cols // 2)
            q = (min(max(q[0], 0), rows - 1), min(max(q[1], 0), cols - 1))
        for rec, m in zip(layers, maps):
            p = m.num_prefix_tokens
            patches = m.weights[:, :, p:, p:]
            patches = patches / patches.sum(-1, keepdim=True).clamp_min(1e-30)  # [B', H, M, M]
            rec["distance_sum"] = rec["distance_sum"] + attention_distance(
                m.weights, m.grid, m.patch_size, p).double() * count
            rec["similarity_sum"] += (head_similarity(m.weights) if m.num_heads > 1 else float("nan")) * count
            rec["full_sum"] = rec["full_sum"] + patches.double().sum(0)
            rec["maps_seen"] += patches.shape[0]
            if "query_map" not in rec:
                r, c = min(q[0], m.grid[0] - 1), min(q[1], m.grid[1] - 1)
                rec["query_map"] = patches[0, :, r * m.grid[1] + c].reshape(-1, *m.grid).numpy()
    out = []
    for rec in layers:
        distances = (rec.pop("distance_sum") / n).tolist()
        rec["distances"] = distances
        rec["similarity"] = rec.pop("similarity_sum") / n
        rec["spread"] = distance_spread(distances)
        rec["full_map"] = (rec.pop("full_sum") / rec.pop("maps_seen")).float().numpy()
        out.append(rec)
    return {"layers": out, "query": list(q), "images": n}


def choose_landscape_loss(kind: str, models: list[ModelUnderTest], teacher_spec: str | None, device: str,
                          notes: list[str]):
    """('fd', Teacher, name) | ('drift', None, None) | ('none', None, None) for --landscape-loss KIND."""
    if kind == "none":
        return "none", None, None
    if kind in ("auto", "fd"):
        spec = None
        if teacher_spec:
            name, _, weights = teacher_spec.partition("@")
            spec = {"name": name, "weights": weights or None, "img_size": None}
        else:
            spec = next((m.teacher for m in models if m.teacher and m.teacher.get("name")), None)
        if spec is None:
            if kind == "fd":
                raise FDFastError("--landscape-loss fd needs a teacher: diagnose a run whose config.yaml names one, "
                                  "or pass --teacher NAME[@WEIGHTS]")
        else:
            from fdfast.models.teachers import build_teacher
            img_size = spec.get("img_size") or models[0].image_size[0]
            try:
                teacher = build_teacher(spec["name"], weights=spec.get("weights"), img_size=img_size).to(device)
                return "fd", teacher, spec["name"]
            except FDFastError as e:
                if kind == "fd":
                    raise
                notes.append(f"teacher {spec['name']!r} unavailable ({e}); landscape uses the drift proxy")
    return "drift", None, None


def landscape_of(mut: ModelUnderTest, images, kind: str, teacher, teacher_images, cfg: dict, progress: bool,
                 notes: list[str]) -> dict:
    """1-D and 2-D slices of the chosen loss around one model's weights (uint8 images at its input size)."""
    x = to_tensor(images, mut.mean, mut.std).to(next(mut.model.parameters()).device)
    bs = cfg["batch_size"]
    if kind == "fd":
        tx = to_tensor(teacher_images, teacher.mean, teacher.std).to(x.device)
        projection, source = mut.extra.get("projection"), "ridge least squares at the centre"
        teacher_name = (mut.teacher or {}).get("name")
        if projection is not None and teacher_name == teacher.name and projection[0].shape == (
                teacher.dim, mut.model.num_features):
            projection = (projection[0].to(x.device), None if projection[1] is None else projection[1].to(x.device))
            source = f"trained ({mut.extra['projection_source']})"
        else:
            projection = None
        loss_fn = ls.fd_loss(x, teacher, mut.model, teacher_images=tx, batch_size=bs, projection=projection)
        if projection is None and loss_fn.fit_tokens < 4 * loss_fn.fit_channels:
            notes.append(f"{mut.label}: the ridge projection is fitted on {loss_fn.fit_tokens} tokens for "
                         f"{loss_fn.fit_channels} channels, so its loss at the weights is optimistic; "
                         "raise --landscape-images")
    else:
        loss_fn, source = ls.representation_drift_loss(x, mut.model, batch_size=bs), None
    one = ls.landscape_1d(mut.model, loss_fn, cfg["steps_1d"], cfg["span"], seed=cfg["seed"], progress=progress)
    one["curvature"] = ls.curvature_1d(one["alphas"], one["losses"])
    two = ls.landscape_2d(mut.model, loss_fn, cfg["steps_2d"], cfg["span"], seed=cfg["seed"], progress=progress) \
        if cfg["steps_2d"] > 1 else None
    return {"1d": one, "2d": two, "projection": source}


def diagnose(models: list[ModelUnderTest], paths: list[Path], out_dir, *, batch_size: int = 8,
             query: tuple[int, int] | None = None, landscape_loss: str = "auto", teacher: str | None = None,
             landscape: dict | None = None, device: str = "cpu", progress: bool = True) -> dict:
    """Run every diagnostic on 1-2 models and write the files; returns {"files": [...], "seconds": ...}."""
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lcfg = {"steps_1d": 9, "steps_2d": 5, "span": 1.0, "images": 8, "batch_size": batch_size, "seed": 0}
    lcfg.update(landscape or {})
    notes: list[str] = []
    raw = [load_images(paths, m.image_size) for m in models]
    written = []

    # ---- attention: distance, diversity, maps ----
    stats = []
    for k, m in enumerate(models):
        x = to_tensor(raw[k], m.mean, m.std).to(device)
        s = attention_statistics(m.model, x, batch_size, query)
        stats.append(s)
        windowed = any(l["windowed"] for l in s["layers"])
        name = "attention_maps.png" if k == 0 else f"attention_maps_{k + 1}.png"
        plots.plot_attention_maps([l["query_map"] for l in s["layers"]], [l["full_map"] for l in s["layers"]],
                                  [l["name"] for l in s["layers"]], tuple(s["query"]),
                                  None if windowed else raw[k][0], m.label, out / name)
        written.append(name)

    def model_meta(m, s):
        return {"label": m.label, "source": m.source, "image_size": list(m.image_size), "images": s["images"],
                "layer_names": [l["name"] for l in s["layers"]],
                "patch_size": [l["patch_size"] for l in s["layers"]], "grid": [l["grid"] for l in s["layers"]],
                "num_prefix_tokens": s["layers"][0]["num_prefix_tokens"]}

    dist_models = [dict(model_meta(m, s), layers=[l["distances"] for l in s["layers"]]) for m, s in zip(models, stats)]
    _write_json(out / "attention_distance.json", {
        "layers": dist_models[0]["layers"], "unit": "px",
        "definition": "per head: attention-weighted mean distance between patch centres over patch-token keys "
                      "(weights renormalised over them), averaged over patch-token queries and images",
        "models": dist_models})
    plots.plot_attention_distance([{"label": d["label"], "layers": d["layers"], "image_size": d["image_size"][0]}
                                   for d in dist_models], out / "attention_distance.png")
    div_models = [dict(model_meta(m, s), layers=[
        {"similarity": l["similarity"], "distance_std": l["spread"]["std"], "distance_min": l["spread"]["min"],
         "distance_max": l["spread"]["max"]} for l in s["layers"]]) for m, s in zip(models, stats)]
    _write_json(out / "head_diversity.json", {
        "layers": div_models[0]["layers"],
        "definition": "similarity: mean pairwise cosine of the heads' flattened attention maps (1 identical, "
                      "0 disjoint), averaged over images; distance_*: spread of head attention distance (px)",
        "models": div_models})
    plots.plot_head_diversity([{"label": d["label"], "similarity": [l["similarity"] for l in d["layers"]],
                                "distance_std": [l["distance_std"] for l in d["layers"]]} for d in div_models],
                              out / "head_diversity.png")
    written += ["attention_distance.json", "attention_distance.png", "head_diversity.json", "head_diversity.png"]
    t_attention = time.perf_counter() - t0

    # ---- loss landscape ----
    kind, teacher_model, teacher_name = choose_landscape_loss(landscape_loss, models, teacher, device, notes)
    land = None
    if kind != "none":
        few = paths[:lcfg["images"]]
        teacher_images = None if teacher_model is None else load_images(few, (teacher_model.img_size,) * 2)
        loss_name = (f"FD loss vs teacher {teacher_name} (smooth-L1, beta 2, whitened target)"
                     if kind == "fd" else "representation drift (smooth-L1 of whitened tokens vs unperturbed model)")
        short = f"FD loss vs {teacher_name}" if kind == "fd" else "representation drift loss"
        results = [landscape_of(m, raw[k][:len(few)], kind, teacher_model, teacher_images, lcfg, progress, notes)
                   for k, m in enumerate(models)]
        land = {"loss": kind, "loss_name": loss_name, "teacher": teacher_name, "images": len(few),
                "directions": "filter-normalised Gaussian (Li et al. 2018), 1-D parameters fixed",
                "1d": results[0]["1d"], "2d": results[0]["2d"],
                "models": [dict(label=m.label, **r) for m, r in zip(models, results)]}
        _write_json(out / "loss_landscape.json", land)
        plots.plot_landscape_1d([dict(label=m.label, loss_name=short, **r["1d"]) for m, r in zip(models, results)],
                                out / "loss_landscape_1d.png")
        written += ["loss_landscape.json", "loss_landscape_1d.png"]
        if results[0]["2d"] is not None:
            plots.plot_landscape_2d([dict(label=m.label, loss_name=short, **r["2d"])
                                     for m, r in zip(models, results)], out / "loss_landscape_2d.png")
            written.append("loss_landscape_2d.png")
    seconds = time.perf_counter() - t0

    from fdfast.diagnostics.report import write_report
    write_report(out / "report.html", models=dist_models, diversity=div_models, landscape=land, files=written,
                 notes=notes, timing={"attention_s": t_attention, "total_s": seconds})
    written.append("report.html")
    return {"files": written, "seconds": time.perf_counter() - t0, "notes": notes}


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(_finite(obj), indent=1, default=_jsonable, allow_nan=False) + "\n")


def _finite(x):
    """NaN / inf -> null (strict JSON): e.g. the head similarity of a one-head layer is undefined."""
    if isinstance(x, float):
        return x if np.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, torch.Tensor):
        return x.tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
