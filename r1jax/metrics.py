"""Run outputs a researcher reads and plots: metrics.jsonl, TensorBoard events, PNG curves,
samples.jsonl and summary.json. Only process 0 writes; other processes get a no-op writer."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional

import numpy as np

# The curves every run plots (metric key -> file name); missing keys are skipped.
PLOTS = {
    "reward/mean": "reward.png",
    "accuracy": "accuracy.png",
    "completion/length_mean": "length.png",
    "kl": "kl.png",
    "loss/policy": "loss.png",
    "entropy": "entropy.png",
}

# The names users see for the update step's metrics (metrics.jsonl, TensorBoard, the progress
# bar), defined here once; every update metric is also logged as `update/<its name>`.
UPDATE_NAMES = {
    "kl": "kl",
    "entropy": "entropy",
    "pg_loss": "loss/policy",
    "clip_frac_low": "clip/low",
    "clip_frac_high": "clip/high",
    "clip_frac": "clip/region",
    "grad_norm": "grad_norm",
    "lr": "lr",
}


def update_row(update_metrics: Mapping[str, float]) -> Dict[str, Any]:
    """One update's metrics as metrics.jsonl names them: every key as `update/<key>`, and the
    UPDATE_NAMES ones under their user-facing names too."""
    row: Dict[str, Any] = {f"update/{k}": v for k, v in update_metrics.items()}
    row.update({name: update_metrics.get(k) for k, name in UPDATE_NAMES.items()})
    return row


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    if hasattr(v, "item") and getattr(v, "shape", None) == ():
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class MetricsWriter:
    def __init__(self, run_dir: str, *, tensorboard: bool = True, enabled: bool = True):
        self.run_dir = run_dir
        self.enabled = enabled
        self._tb = None
        self._f = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._f = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(logdir=run_dir)

    def truncate_after(self, step: int) -> None:
        """Drop rows past `step`: a resumed run rewrites the updates its predecessor logged
        after the checkpoint it resumes from, so each step appears once."""
        if not self.enabled:
            return
        path = os.path.join(self.run_dir, "metrics.jsonl")
        self._f.close()
        rows = [r for r in read_metrics(self.run_dir) if r.get("step", 0) <= step]
        with open(path + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(path + ".tmp", path)
        self._f = open(path, "a", buffering=1)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({k: _jsonable(v) for k, v in metrics.items()})
        self._f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, int(step))

    def write_samples(self, step: int, samples: Iterable[Mapping[str, Any]]) -> None:
        if not self.enabled:
            return
        with open(os.path.join(self.run_dir, "samples.jsonl"), "a") as f:
            for s in samples:
                f.write(json.dumps({"step": int(step), **{k: _jsonable(v) for k, v in s.items()}}) + "\n")

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(run_dir: str) -> List[Dict[str, Any]]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_run(run_dir: str, extra_points: Optional[Mapping[str, Mapping[str, float]]] = None) -> List[str]:
    """Write plots/*.png from metrics.jsonl. `extra_points` adds labelled horizontal markers to
    a curve (e.g. the eval accuracy before and after RL on the accuracy plot)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    out_dir = os.path.join(run_dir, "plots")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for key, fname in PLOTS.items():
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        marks = (extra_points or {}).get(key, {})
        if not pts and not marks:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        if pts:
            steps, vals = zip(*pts)
            ax.plot(steps, vals, lw=1, alpha=0.5, label=key)
            if len(vals) >= 5:
                k = max(2, len(vals) // 10)
                smooth = np.convolve(vals, np.ones(k) / k, mode="valid")
                ax.plot(steps[k - 1:], smooth, lw=2, label=f"{key} (mean of {k})")
        for label, y in marks.items():
            ax.axhline(y, ls="--", lw=1, color="k" if "after" in label else "gray")
            ax.annotate(f"{label}: {y:.3f}", xy=(0.01, y), xycoords=("axes fraction", "data"),
                        fontsize=8, va="bottom")
        ax.set_xlabel("update")
        ax.set_title(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        path = os.path.join(out_dir, fname)
        fig.savefig(path)
        plt.close(fig)
        written.append(path)
    return written
