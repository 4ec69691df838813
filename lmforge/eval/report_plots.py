"""The figures and the rendering of `lmforge report` (lmforge/eval/report.py): PNGs from matplotlib's Agg backend,
and the report's blocks as one self-contained HTML page or as Markdown.

    png = curves_png("pretrain", train_records, eval_records)   # loss, lr, tokens/s (and reward) vs step
    png = funnel_png(kept=(327, 4_968_000), rejected=[("gopher_repetition/duplicate_lines", 5, 70_000)])
    page = render_html("title", blocks)                          # every PNG inline as a data: URI

Figures are built on `matplotlib.figure.Figure` with its own Agg canvas, never pyplot: no global figure state,
no backend switch for the caller, nothing shown. The PNGs carry no timestamp or software tag, so the same
inputs give the same bytes (the report is deterministic apart from the time it states it was made). Every text
from a run is escaped: html.escape in the page; in the Markdown, & and < outside code blocks (a renderer would take
them for HTML), quotes and > left readable.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
import warnings

DPI = 100
# The fourth panel of a stage's curves, when its records hold any of these (GRPO and PPO log them).
REWARD_KEYS = ("reward", "accuracy", "val_accuracy")


def _figure(width: float, height: float, ncols: int = 1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, list(axes)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():  # a label in a script the font lacks draws as boxes; no need to warn about it
        warnings.simplefilter("ignore")
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records holding a finite number under `key`."""
    xs, ys = [], []
    for r in records:
        v, s = r.get(key), r.get("step")
        if isinstance(v, (int, float)) and isinstance(s, (int, float)) and math.isfinite(v):
            xs.append(s)
            ys.append(v)
    return xs, ys


def curves_png(stage: str, train: list[dict], evals: list[dict]) -> bytes | None:
    """One figure for a training stage: loss (train and val), learning rate, tokens/s and, where logged, reward
    and accuracy, each against the step. None when there is nothing to plot."""
    panels = [("loss", [(train, "loss", "train"), (evals, "val_loss", "val")]),
              ("learning rate", [(train, "lr", "lr")]),
              ("tokens/s", [(train, "tokens_per_s", "tokens/s")])]  # fmt: skip
    reward = [(train, k, k) for k in REWARD_KEYS[:2]] + [(evals, REWARD_KEYS[2], "val accuracy")]
    if any(_series(recs, k)[0] for recs, k, _ in reward):
        panels.append(("reward / accuracy", reward))
    if not any(_series(recs, k)[0] for _, lines in panels for recs, k, _ in lines):
        return None
    fig, axes = _figure(3.6 * len(panels), 3.0, len(panels))
    for ax, (title, lines) in zip(axes, panels, strict=True):
        for recs, key, label in lines:
            xs, ys = _series(recs, key)
            if xs:
                ax.plot(xs, ys, marker="o" if recs is evals else None, markersize=4, label=label)
        ax.set_title(f"{stage}: {title}", fontsize=10)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        if len([1 for recs, key, _ in lines if _series(recs, key)[0]]) > 1:
            ax.legend(fontsize=8)
    return _png(fig)


def funnel_png(kept: tuple[int, int | None], rejected: list[tuple[str, int, int | None]]) -> bytes:
    """Horizontal bars: documents (and, when known, bytes) kept and rejected by each step/reason."""
    labels = ["kept"] + [r[0] for r in rejected]
    docs = [kept[0]] + [r[1] for r in rejected]
    sizes = [kept[1]] + [r[2] for r in rejected]
    with_bytes = all(b is not None for b in sizes)
    fig, axes = _figure(11.0 if with_bytes else 6.5, 0.9 + 0.35 * len(labels), 2 if with_bytes else 1)
    colors = ["#4c9a5b"] + ["#c0504d"] * len(rejected)
    columns = [("documents", docs)] + ([("bytes", sizes)] if with_bytes else [])
    for ax, (what, values) in zip(axes, columns, strict=True):
        ys = list(range(len(labels)))[::-1]  # kept on top, then the reasons in the table's order
        ax.barh(ys, values, color=colors)
        ax.set_yticks(ys, labels if ax is axes[0] else [""] * len(labels), fontsize=8)
        ax.set_xscale("symlog")  # a handful of rejections next to a corpus of thousands stay visible
        ax.set_xlim(0, max(values + [1]) * 40)  # room for the numbers
        for y, v in zip(ys, values, strict=True):
            ax.text(max(v, 0) * 1.05 + 0.5, y, f"{v:,}", va="center", fontsize=8)
        ax.set_title(what, fontsize=10)
    return _png(fig)


# ---- rendering the report's blocks: ("h", level, text, id), ("p"|"note", text), ("table", head, rows),
# ("img", file name, png, alt), ("pre", title, text), ("details", summary, text)

CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1200px;margin:1.5em auto;padding:0 1em;
color:#222}
h1{font-size:1.6em}h2{border-bottom:2px solid #ccc;margin-top:2em}h3{margin-top:1.6em}h4{margin:1em 0 .3em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:3px 8px;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
pre{background:#f7f7f7;border:1px solid #ddd;padding:.6em;max-height:26em;overflow:auto;white-space:pre-wrap}
img{max-width:100%;display:block;margin:.5em 0}.note{color:#8a4b00;font-style:italic}nav{font-size:.9em}nav .l3{margin-left:1.5em}
details{margin:.3em 0}summary{cursor:pointer;font-family:monospace}
"""


def render_html(title: str, blocks: list[tuple]) -> str:
    e = html.escape
    nav = [
        f'<li class="l{b[1]}"><a href="#{b[3]}">{e(b[2])}</a></li>' for b in blocks if b[0] == "h" and b[1] in (2, 3)
    ]
    parts = [f"<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\">\n<title>{e(title)}</title>",
             f"<style>{CSS}</style>\n</head>\n<body>"]  # fmt: skip
    for b in blocks:
        kind = b[0]
        if kind == "h":
            parts.append(f'<h{b[1]} id="{b[3]}">{e(b[2])}</h{b[1]}>')
            if b[3] == "top":
                parts.append("<nav><ul>" + "".join(nav) + "</ul></nav>")
        elif kind in ("p", "note"):
            parts.append(f'<p class="note">{e(b[1])}</p>' if kind == "note" else f"<p>{e(b[1])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{e(str(h))}</th>" for h in b[1])
            body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>\n" for row in b[2])
            parts.append(f"<table>\n<tr>{head}</tr>\n{body}</table>")
        elif kind == "img":
            data = base64.b64encode(b[2]).decode("ascii")
            parts.append(f'<img alt="{e(b[3])}" src="data:image/png;base64,{data}">')
        elif kind == "pre":
            parts.append(f"<h4>{e(b[1])}</h4>\n<pre>{e(b[2])}</pre>")
        elif kind == "details":
            parts.append(f"<details><summary>{e(b[1])}</summary>\n<pre>{e(b[2])}</pre></details>")
    parts.append("</body>\n</html>\n")
    return "\n".join(parts)


def _fence(text: str) -> str:
    ticks = max((len(m) for m in re.findall(r"`+", text)), default=0)
    return "`" * max(3, ticks + 1)


def _cell(text) -> str:
    return _md(str(text)).replace("|", "\\|").replace("\n", " ")


def _md(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace("*", "\\*")  # (a * would start emphasis)


def render_md(blocks: list[tuple]) -> str:
    parts = []
    for b in blocks:
        kind = b[0]
        if kind == "h":
            parts.append(f"{'#' * b[1]} {_cell(b[2])}")
        elif kind == "p":
            parts.append(_md(b[1]))
        elif kind == "note":
            parts.append(f"*{_md(b[1])}*")
        elif kind == "table":
            lines = ["| " + " | ".join(_cell(h) for h in b[1]) + " |", "|" + "---|" * len(b[1])]
            lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in b[2]]
            parts.append("\n".join(lines))
        elif kind == "img":
            parts.append(f"![{_cell(b[3])}](report_files/{b[1]})")
        elif kind == "pre":
            fence = _fence(b[2])
            parts.append(f"**{_cell(b[1])}**\n\n{fence}\n{b[2].rstrip()}\n{fence}")
        elif kind == "details":
            fence = _fence(b[2])
            parts.append(
                f"<details><summary>{_cell(b[1])}</summary>\n\n{fence}\n{b[2].rstrip()}\n{fence}\n\n</details>"
            )
    return "\n\n".join(parts) + "\n"
