"""The attempts of one or more runs drawn on a time axis: the report's picture and the benchmark's, one code.

A row is a run (or a launcher's run in the benchmark): coloured spans for what it was doing (starting its Ray
cluster, starting up, training, being torn down, backing off), ticks for its steps, a red cross where a failure
was known.
matplotlib is imported only here, only when a picture is drawn.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPAN_STYLES = {
    "cluster start": {"color": "tab:purple", "alpha": 0.4},
    "start-up": {"color": "tab:gray", "alpha": 0.5},
    "training": {"color": "tab:blue", "alpha": 0.7},
    "teardown": {"color": "tab:orange", "alpha": 0.8},
    "backoff": {"color": "tab:olive", "alpha": 0.5},
}


@dataclass
class Span:
    start: float
    end: float
    kind: str
    """One of ``SPAN_STYLES`` (or of the styles handed to ``draw_timeline``)."""


@dataclass
class TimelineRow:
    label: str
    spans: list[Span] = field(default_factory=list)
    steps: list[float] = field(default_factory=list)
    failures: list[float] = field(default_factory=list)
    note: str | None = None
    note_at: float | None = None


def draw_timeline(
    rows: list[TimelineRow],
    path: Path,
    title: str,
    xlabel: str,
    styles: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """``styles``: each span kind's bar style (matplotlib's ``barh`` keywords); ``SPAN_STYLES`` by default."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 0.7 * len(rows) + 1.8))
    used: set[str] = set()
    for index, row in enumerate(rows):
        for span in row.spans:
            if span.end > span.start:
                style = (styles or SPAN_STYLES)[span.kind]
                label = span.kind if span.kind not in used else None
                used.add(span.kind)
                ax.barh(index, span.end - span.start, left=span.start, height=0.5, label=label, **style)
        if row.steps:
            ax.plot(row.steps, [index] * len(row.steps), "|", color="black", markersize=10)
        for failure in row.failures:
            ax.plot(failure, index, "x", color="red", markersize=12, mew=3)
        if row.note and row.note_at is not None:
            ax.text(row.note_at, index, f"  {row.note}", va="center", color="red")
    ax.set_xlim(left=0)
    ax.set_yticks(range(len(rows)), [row.label for row in rows])
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.invert_yaxis()
    if used:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=min(len(used), 5), frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
