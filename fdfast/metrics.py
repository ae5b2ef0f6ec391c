"""What a run reports while it runs: metrics.jsonl + TensorBoard (``MetricsLog``) and the terminal (``Progress``).

Both are written by rank 0 only; other ranks get disabled instances, so the loop calls them unconditionally.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


class MetricsLog:
    """DIR/metrics.jsonl (one JSON object per logged step) + TensorBoard scalars under DIR/tb.

    On resume, rows a crashed run logged after the checkpoint it resumes from are dropped, so the file never holds
    a step twice; TensorBoard purges the same steps.
    """

    def __init__(self, out_dir: Path | None, resume_step: int, tensorboard: bool, enabled: bool = True,
                 prefix: str = "train"):
        self.enabled = enabled and out_dir is not None
        self.prefix, self.writer = prefix, None
        if not self.enabled:
            return
        self.path = Path(out_dir) / "metrics.jsonl"
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(Path(out_dir) / "tb"), purge_step=resume_step + 1)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.writer.add_scalar(f"{self.prefix}/{k}", v, row["step"])

    def last(self, key: str):
        """``key`` of the newest row that has it (None: no such row)."""
        if not self.enabled or not self.path.exists():
            return None
        rows = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
        return next((r[key] for r in reversed(rows) if key in r), None)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class Progress:
    """A tqdm bar (loss, lr, img/s, ETA) on a terminal; one plain line per logged step otherwise (CI logs)."""

    def __init__(self, desc: str, total: int, start: int, enabled: bool):
        self.enabled, self.total, self.desc = enabled, total, desc
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True)
        self.start = self.last = start

    def update(self, step: int, row: dict, loss_key: str = "loss") -> None:
        if not self.enabled:
            return
        extra = "".join(f"  {k} {row[k]:.2f}" for k in ("top1", "top5") if k in row)
        loss = "n/a" if row[loss_key] is None else f"{row[loss_key]:.4f}"  # None: every step since the last row skipped
        if self.bar is not None:
            self.bar.update(step - self.last)
            self.bar.set_postfix(loss=loss, lr=f"{row['lr']:.2e}", img_s=f"{row['img_per_s']:.1f}")
            if extra:
                self.bar.write(f"step {step}/{self.total}{extra}")
        else:
            eta = row["elapsed_s"] / max(step - self.start, 1) * (self.total - step)
            epoch = f"epoch {row['epoch']}  " if "epoch" in row else ""
            print(f"{self.desc} {epoch}step {step}/{self.total}  loss {loss}  lr {row['lr']:.2e}  "
                  f"{row['img_per_s']:.1f} img/s{extra}  {row['elapsed_s']:.0f}s  eta {eta:.0f}s",
                  file=sys.stderr, flush=True)
        self.last = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
