"""Charts, drawn with matplotlib (no pyplot: no window, no global figure state, the Agg canvas
a Figure saves with): the trainers' loss curves and evaluate.py's code-frequency histogram.
"""
import math
import os

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

BAR_COLOUR = (31, 119, 180)  # the histogram's bars: matplotlib's first line colour, #1f77b4


def plot_curves(records, panels, path, title=""):
    """Plot metrics against `step` into a PNG: one panel per (panel title, keys), e.g. training
    losses beside validation metrics.

    Made to read alike for a 30-step and a 30,000-step run: whole-number step ticks, a marker
    on every point while a curve has few of them (a single point still shows), and a log y axis
    where a panel's values span more than 100x.
    """
    width, gap = 4.8 * len(panels), 0.75  # inches; margins fixed (a layout engine would double
    # the time of a plot that is redrawn at every checkpoint)
    figure = Figure(figsize=(width, 4.2), dpi=100)
    figure.subplots_adjust(left=gap / width, right=1 - 0.2 / width, bottom=0.12, top=0.86,
                           wspace=gap / (4.8 - gap))
    figure.suptitle(title)
    for axes, (panel_title, keys) in zip(figure.subplots(1, len(panels), squeeze=False)[0],
                                         panels):
        values = []
        for key in keys:
            points = [(r["step"], r[key]) for r in records
                      if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if points:
                steps, ys = zip(*points)
                axes.plot(steps, ys, label=key, linewidth=1.2, markersize=3,
                          marker="o" if len(points) <= 50 else None)
                values += ys
        if values:
            if min(values) > 0 and max(values) / min(values) > 100:
                axes.set_yscale("log")
            axes.legend(fontsize=8)
        else:
            axes.text(0.5, 0.5, "no data yet", ha="center", va="center",
                      transform=axes.transAxes)
        axes.set_title(panel_title, fontsize=10)
        axes.set_xlabel("step")
        axes.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
        axes.xaxis.set_major_formatter(FuncFormatter(lambda step, _: f"{step:,.0f}"))
        axes.grid(alpha=0.3)
    figure.savefig(path)


def save_code_histogram(counts, path, title=""):
    """Bar chart PNG of code frequencies (n_embed,) sorted from the most to the least used code,
    so that collapse shows as a short head and a long flat tail."""
    frequencies = counts.double() / max(1, int(counts.sum()))
    frequencies = frequencies.sort(descending=True).values.tolist()
    used = sum(frequency > 0 for frequency in frequencies)
    figure = Figure(figsize=(7.2, 3.6), dpi=100)
    figure.subplots_adjust(left=0.1, right=0.97, bottom=0.15, top=0.88)
    axes = figure.subplots()
    # a few bars stand apart; a thousand codes fill the plot. Not antialiased: exact colours
    axes.bar(range(used), frequencies[:used], width=0.8 if len(frequencies) <= 200 else 1.0,
             color=[c / 255 for c in BAR_COLOUR], linewidth=0, antialiased=False)
    axes.set_xlim(-0.5, len(frequencies) - 0.5)
    axes.set_xlabel(f"{len(frequencies)} codes, most used first")
    axes.set_ylabel("fraction of tokens")
    axes.set_title(title, fontsize=9)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path)
