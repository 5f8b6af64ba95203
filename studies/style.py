"""One plotting style for every study: theory as lines, measurement as markers with error bars.

:func:`draw` picks the look from the curve's ``source`` (the attribute every result carries):
``exact`` (theory) is a line, ``simulation`` (Monte Carlo) open markers, ``measurement`` filled
markers, each with its standard error as error bars when given; the source goes into the legend
label, so a figure says which curve is prediction and which is measured.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["draw", "figure", "save", "SOURCE_LABEL"]

SOURCE_LABEL = {"exact": "theory", "simulation": "Monte Carlo", "measurement": "measured"}
_STYLE = {
    "exact": dict(ls="-", marker=None),
    "simulation": dict(ls="none", marker="o", mfc="none", ms=4),
    "measurement": dict(ls="none", marker="o", ms=4),
}


def draw(ax, x, y, *, source: str, label: str | None = None, err=None, color=None, connect: bool = False, **kwargs):
    """Draw one curve in the style of its ``source``; ``err`` (same shape as ``y``) adds error bars.

    ``connect`` joins measured markers with a thin line (for sparse measurements along training).
    The legend label becomes ``"<label> (<theory | Monte Carlo | measured>)"``.
    """
    if source not in _STYLE:
        raise ValueError(f"`source` must be one of {tuple(_STYLE)}; got {source!r}.")
    style = dict(_STYLE[source], **kwargs)
    if connect and source != "exact":
        style.update(ls="-", lw=0.8)
    text = None if label is None else f"{label} ({SOURCE_LABEL[source]})"
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if err is None:
        return ax.plot(x, y, color=color, label=text, **style)
    return ax.errorbar(x, y, yerr=np.asarray(err, dtype=np.float64), color=color, label=text, capsize=2, **style)


def figure(n_panels: int, *, width: float = 5.2, height: float = 4.3, **kwargs):
    """A row of ``n_panels`` axes."""
    fig, axes = plt.subplots(1, n_panels, figsize=(width * n_panels, height), squeeze=False, **kwargs)
    return fig, axes[0]


def save(fig, path: str, *, dpi: int = 110, rect=None) -> None:
    """Lay ``fig`` out tightly (``rect``: the part of the figure the axes may fill, (left, bottom,
    right, top) in figure fractions, leaving room for a figure legend), write it to ``path`` (the
    format from the suffix) at ``dpi`` and close it."""
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
