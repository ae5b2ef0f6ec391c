"""`fdfast diagnose MODEL [MODEL2]`: attention distance, head diversity, attention maps, loss landscape."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fdfast.errors import FDFastError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "diagnose", help="attention distance, head diversity, attention maps, loss landscape -> JSON, PNG, HTML",
        description="Diagnose why FD works: per-head attention distance, head diversity, attention maps and "
                    "loss-landscape slices of one model, or two side by side. MODEL: a run directory, a checkpoint "
                    "(step directory or .safetensors), an exported file, or teacher:NAME[@WEIGHTS].",
        epilog="writes to --out: attention_distance.json/.png, head_diversity.json/.png, attention_maps.png "
               "(attention_maps_2.png for MODEL2), loss_landscape.json + loss_landscape_1d.png / _2d.png, and "
               "report.html (self-contained). Example: fdfast diagnose runs/demo teacher:demo-dinov2-s14")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("model2", metavar="MODEL2", nargs="?", help="a second model, plotted beside the first")
    p.add_argument("--data", help="image folder (searched recursively); default: the data source \"demo-images\" "
                   "(the demo photos)")
    p.add_argument("--images", type=int, default=16, help="images for the attention statistics (default 16)")
    p.add_argument("--out", help="output folder (default: RUN/diagnostics for a run, else ./diagnostics)")
    p.add_argument("--img-size", type=int, help="input size of teacher:NAME models (default: the first model's)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--query", help="query patch ROW,COL for the attention maps (default: the centre patch)")
    p.add_argument("--landscape-loss", choices=["auto", "fd", "drift", "none"], default="auto",
                   help="auto: the FD loss against the run's teacher when there is one, else 'drift' (the model's "
                        "own unperturbed whitened tokens as target); none: skip the landscape")
    p.add_argument("--teacher", help="teacher NAME[@WEIGHTS] for the FD loss (default: the run's)")
    p.add_argument("--landscape-steps", type=int, default=9, help="points of the 1-D slice (default 9)")
    p.add_argument("--landscape-grid", type=int, default=5, help="points per axis of the 2-D slice (default 5; "
                   "1 skips it)")
    p.add_argument("--landscape-span", type=float, default=1.0, help="slice over [-span, span] (default 1)")
    p.add_argument("--landscape-images", type=int, default=8, help="images the landscape loss uses (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random directions")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=main)


def _query(text: str | None):
    if text is None:
        return None
    try:
        row, col = (int(v) for v in text.split(","))
    except ValueError:
        raise FDFastError(f"--query expects ROW,COL (e.g. 3,4), got {text!r}") from None
    return row, col


def main(args: argparse.Namespace) -> int:
    from fdfast.diagnostics.inputs import image_paths, load_model_under_test
    from fdfast.diagnostics.run import diagnose

    for name in ("images", "batch_size", "landscape_steps", "landscape_grid", "landscape_images"):
        if getattr(args, name) < 1:
            raise FDFastError(f"--{name.replace('_', '-')} must be at least 1")
    query = _query(args.query)
    from fdfast.runtime import resolve_device
    device = str(resolve_device(args.device))
    first = load_model_under_test(args.model, args.img_size, device)
    models = [first]
    if args.model2:
        models.append(load_model_under_test(args.model2, args.img_size or first.image_size[0], device))
        if models[0].label == models[1].label:
            models[0].label, models[1].label = f"{models[0].label} (1)", f"{models[1].label} (2)"
    if args.out:
        out = Path(args.out)
    elif Path(args.model).is_dir():
        out = Path(args.model) / "diagnostics"
    else:
        out = Path("diagnostics")
    paths = image_paths(args.data, args.images)
    result = diagnose(models, paths, out, batch_size=args.batch_size, query=query,
                      landscape_loss=args.landscape_loss, teacher=args.teacher, device=device,
                      progress=not args.no_progress and sys.stderr.isatty(),
                      landscape={"steps_1d": args.landscape_steps, "steps_2d": args.landscape_grid,
                                 "span": args.landscape_span, "images": args.landscape_images,
                                 "seed": args.seed})
    for note in result["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(f"diagnosed {', '.join(m.label for m in models)} on {len(paths)} images in {result['seconds']:.1f} s; "
          f"wrote {len(result['files'])} files to {out}/ (open {out / 'report.html'})")
    return 0
