"""Pictures of use: a job's CPU and memory over time (Scheduler.usage samples) and a project's storage against
its quota (sitedb/usage.py, the quota check's own figure). Drawn as SVG by the templates; this module only
scales the numbers (the portal's CSP allows no inline styles, and no script is needed for a picture)."""

from __future__ import annotations

import math
from typing import Any

from nagaya.units import format_size

W, H = 600, 120                     # the charts' viewBox


def _nice(top: float) -> float:
    """A round axis maximum at or above `top` (1, 2 or 5 × 10^n)."""
    if top <= 0:
        return 1.0
    mag = 10.0 ** math.floor(math.log10(top))
    return next(m * mag for m in (1, 2, 5, 10) if m * mag >= top)


def _pow2(top: float) -> float:
    """Byte axes end at a power of two (128 MiB, not 190.7 MiB)."""
    return float(2 ** math.ceil(math.log2(top))) if top > 1 else 1.0


def line_chart(samples: list[dict[str, Any]], key: str, label: str, fmt: Any, top: float = 0.0,
               nice: Any = _nice) -> dict[str, Any] | None:
    """One series as an SVG polyline's points in a W×H box, with its axis labels; None without two samples."""
    pts = [(float(s["t"]), float(s.get(key) or 0)) for s in samples if isinstance(s.get("t"), (int, float))]
    if len(pts) < 2:
        return None
    t0, t1 = pts[0][0], pts[-1][0]
    span = max(t1 - t0, 1e-9)
    ymax = nice(max(top, *(v for _, v in pts)))
    points = " ".join(f"{(t - t0) / span * W:.1f},{H - v / ymax * H:.1f}" for t, v in pts)
    return {"label": label, "points": points, "max": fmt(ymax), "last": fmt(pts[-1][1]),
            "peak": fmt(max(v for _, v in pts)), "span": _duration(t1 - t0), "w": W, "h": H}


def _duration(secs: float) -> str:
    s = int(secs)
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"


def job_charts(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The job page's charts: cores in use, resident memory; and, where the job's GPUs were sampled, their
    utilisation and memory in use (against their size)."""
    charts = [line_chart(samples, "cpu_cores", "CPU (cores in use)", lambda v: f"{v:.2f}", top=1.0),
              line_chart(samples, "rss_bytes", "Memory (resident)", format_size, nice=_pow2)]
    if any(s.get("gpu_mem_total") or s.get("gpu_util") for s in samples):
        gpu = [s for s in samples if s.get("gpu_mem_total") or s.get("gpu_util")]
        total = max(float(s.get("gpu_mem_total") or 0) for s in gpu)
        charts += [line_chart(gpu, "gpu_util", "GPU utilisation (%)", lambda v: f"{v:.0f}%", top=100.0,
                              nice=lambda top: max(100.0, top)),
                   line_chart(gpu, "gpu_mem_bytes", "GPU memory (in use)", format_size, top=total,
                              nice=(lambda top: max(top, total)) if total else _pow2)]
    return [c for c in charts if c is not None]


def storage_bar(used: int, quota: int | None, attachments: int = 0) -> dict[str, Any]:
    """A project's storage: the used part of a W-wide bar (of the quota, or of the use itself when unlimited);
    `attachments`: how much of `used` signatures, SBOMs and lazy-pull squashfs take."""
    whole = quota if quota else max(used, 1)
    frac = min(used / whole, 1.0) if whole else 0.0
    return {"used": format_size(used), "quota": format_size(quota) if quota is not None else "",
            "attachments": format_size(attachments) if attachments else "",
            "width": round(frac * W, 1), "percent": round(used / quota * 100, 1) if quota else None,
            "over": bool(quota is not None and used >= quota), "w": W}
