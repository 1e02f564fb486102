"""Figure helpers every benchmark's plots use: an Agg figure without pyplot, saved atomically.

Matplotlib is imported only when a figure is made.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from calibft.files import atomic_write_bytes


def save_figure(fig: Any, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


def new_figure(*args: Any, **kwargs: Any) -> Any:
    # The object-oriented API with an Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(*args, **kwargs)
    FigureCanvasAgg(fig)
    return fig
