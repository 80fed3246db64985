"""How long a video's denoising will take on this machine, learnt from the videos made here (the page's
estimate before a run)."""

from __future__ import annotations

import numpy as np


class SpeedModel:
    """How long denoising takes on this machine, learnt from the last videos made here: the time before the
    first step (encoding the prompt and the faces), then ``a`` seconds per step plus ``b`` per unit of work
    (longvideo.work_units: frames x pixels x guidance branches x passes). On a GPU the work term dominates; with
    small models on a CPU, a step's fixed Python cost does, which one speed per unit of work cannot describe
    (estimates from that were twice the real time). The error reached is in benchmarks/RESULTS.md."""

    def __init__(self, keep: int = 8):
        self.runs: list[tuple[float, float, float, float]] = []  # (before_s, steps, work, loop_s), newest last
        self.keep = keep

    def record(self, before_s: float, steps: float, work: float, loop_s: float) -> None:
        self.runs = [*self.runs, (before_s, steps, work, loop_s)][-self.keep :]

    def estimate(self, steps: float, work: float) -> float | None:
        """Seconds for a request of ``steps`` (all passes) and ``work``; None before the first video."""
        if not self.runs:
            return None
        a, b = self._per_step_and_unit()
        before = sorted(run[0] for run in self.runs)[len(self.runs) // 2]  # the first step included
        rest = max(steps - 1, 0.0)
        return before + a * rest + b * work * rest / max(steps, 1.0)

    def _per_step_and_unit(self) -> tuple[float, float]:
        """Least squares of loop_s = a * steps + b * work over the runs, a and b not negative; with one kind of run
        only (or a fit that would go negative), the last run's time per step, scaled by work per step."""
        # The first step's own time is not in loop_s (it ends where loop_s starts): one step fewer.
        rows = np.array([[max(s - 1, 0.0), w * max(s - 1, 0.0) / s] for _, s, w, _ in self.runs if s > 0])
        times = np.array([run[3] for run in self.runs if run[1] > 0])
        if len(rows) >= 2 and np.linalg.matrix_rank(rows) == 2:
            (a, b), *_ = np.linalg.lstsq(rows, times, rcond=None)
            if a >= 0 and b >= 0:
                return float(a), float(b)
        _, steps, work, loop = self.runs[-1]
        per_unit = loop / max(work * max(steps - 1, 1) / steps, 1e-9)
        return 0.0, per_unit
