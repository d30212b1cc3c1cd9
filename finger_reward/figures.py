"""Matplotlib figures without pyplot's global state: a grid of panels, and PNG bytes of a figure.

Shared by the HTML report and the training curves; matplotlib is imported only when a figure is
made (`pip install 'finger-reward[eval]'`).
"""

from __future__ import annotations

import io
import math


def figure(panels: int, *, columns: int = 3, size: tuple[float, float] = (4.2, 3.4)):
    """A figure (Agg canvas) with `panels` axes, `columns` per row; returns (figure, the axes in order)."""
    from matplotlib.figure import Figure

    cols = min(columns, panels)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(size[0] * cols, size[1] * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def png(fig, dpi: int = 90) -> bytes:
    """The figure as PNG bytes (no timestamp or software tag, so equal figures give equal bytes)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()
