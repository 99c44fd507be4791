"""What every HTML section of a run's report draws with: tables and inline PNG figures (the page fetches nothing)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from saescope.core.files import atomic_write_bytes


def png(fig, save_to: Path | None = None) -> str:
    """The figure as an inline <img> (and as a PNG file when save_to is given); closes the figure."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    if save_to is not None:
        atomic_write_bytes(save_to, buf.getvalue())
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def figure(ncols: int = 1, *, width: float = 5.2, height: float = 3.3):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height))
    return fig, (axes if ncols > 1 else [axes])


def html_table(head: list[str], rows: list[list]) -> str:
    def cell(v) -> str:
        if isinstance(v, float):
            return "nan" if v != v else f"{v:.4g}"
        return html.escape(str(v))

    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>" + body + "</table>"
