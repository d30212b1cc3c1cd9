"""A self-contained HTML report of FingER results: a summary, a sortable table of videos, frame strips,
score bars, questions and plots.

`write_report` turns `(VideoScore, human scores or None)` pairs into one HTML file that needs
no network: styles are inline and images are base64 PNG data URIs. Plots need matplotlib and
correlations scipy (`pip install 'finger-reward[eval]'`); both are imported only when a report is written.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import math
from pathlib import Path

import numpy as np

from finger_reward.figures import figure, png
from finger_reward.jsonl import read_jsonl
from finger_reward.metrics import plcc, srcc
from finger_reward.questions.record import DIMENSIONS
from finger_reward.results import VideoScore
from finger_reward.video import load_video

STRIP_FPS = 1000.0  # high enough that `max_frames` frames are spread over the whole clip
STRIP_MAX_PIXELS = 256 * 256
_FIELDS = {f.name for f in dataclasses.fields(VideoScore)}

_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;background:#f4f5f7;color:#222}
h1{margin:0 0 8px} h2{margin:0;font-size:1.15em} .muted{color:#666;font-size:.9em}
.card,.plots{background:#fff;border-radius:8px;padding:16px;margin:16px 0;box-shadow:0 1px 3px #0002}
.strip{display:block;height:110px;max-width:100%;object-fit:contain;object-position:left;margin:10px 0;
 image-rendering:pixelated;background:#111}
.plots img{max-width:100%}
.note{color:#8a6d00;font-style:italic} .error{color:#b00020;font-weight:600}
.bar{display:flex;align-items:center;gap:8px;margin:3px 0;font-size:.9em}
.bar .label{width:170px} .bar .value{white-space:nowrap;font-variant-numeric:tabular-nums}
.track{position:relative;flex:0 0 320px;height:14px;background:#e3e5e8;border-radius:7px;overflow:hidden}
.fill{position:absolute;left:0;top:0;bottom:0} .bar.total .label{font-weight:700}
.human{position:absolute;top:0;bottom:0;width:3px;background:#111}
table{border-collapse:collapse;width:100%;margin-top:10px;font-size:.85em} table.corr{width:auto}
th,td{border-bottom:1px solid #e3e5e8;padding:4px 6px;text-align:left;vertical-align:top}
table.sortable th{cursor:pointer;user-select:none} table.sortable th:hover{background:#eef1f5}
td.num{font-variant-numeric:tabular-nums;text-align:right}
"""


def load_results(path: str | Path) -> list[tuple[VideoScore, dict | None]]:
    """Read RESULTS.jsonl: one `VideoScore.to_dict()` per line, optionally with a "human" score dict."""
    path = Path(path)
    results = []
    for where, data in read_jsonl(path, objects=True):
        try:
            results.append(_parse_record(data))
        except (ValueError, TypeError, KeyError) as err:
            raise ValueError(f"{where}: not a result record ({err})") from None
    return results


def _parse_record(data: dict) -> tuple[VideoScore, dict | None]:
    human = data.get("human")
    if human is not None and not isinstance(human, dict):
        raise TypeError(f"'human' must be an object of scores, got {type(human).__name__}")
    human = None if human is None else {str(k): math.nan if v is None else float(v) for k, v in human.items()}
    return VideoScore.from_dict({k: v for k, v in data.items() if k in _FIELDS}), human


def write_report(
    results: list[tuple[VideoScore, dict | None]],
    out_path: str | Path,
    *,
    frames_per_strip: int = 6,
    title: str = "FingER scores",
    summary: str | None = None,
) -> Path:
    """Write the HTML report of `results` to `out_path` and return that path.

    `summary` (e.g. `evaluate.format_table` of a benchmark's figures) is shown as is, at the top.
    """
    if frames_per_strip < 1:
        raise ValueError(f"frames_per_strip must be >= 1, got {frames_per_strip}")
    scores = _Scores.of(results)
    head = f"<h1>{html.escape(title)}</h1>" + _summary(results, scores, summary) + _video_table(results)
    body = head + _plots(scores) + "\n".join(_card(s, h, frames_per_strip, i) for i, (s, h) in enumerate(results))
    page = (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head>\n<body>\n{body}\n<script>{_SORT_SCRIPT}</script>\n</body></html>\n")
    out_path = Path(out_path)
    out_path.write_text(page, encoding="utf-8")
    return out_path


# ---- summary and the sortable table of videos -----------------------------------------------------

# Clicking a header of a `table.sortable` sorts its rows by that column (numbers as numbers, NaN last).
_SORT_SCRIPT = """
document.querySelectorAll('table.sortable th').forEach((th, col) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0], up = th.dataset.dir !== 'asc';
  th.dataset.dir = up ? 'asc' : 'desc';
  const key = r => { const v = r.cells[col].dataset.v ?? r.cells[col].textContent; const n = parseFloat(v);
                     return isNaN(n) ? (v === '' || v === 'nan' ? null : v) : n; };
  [...body.rows].sort((a, b) => { const x = key(a), y = key(b);
    if (x === null || y === null) return (x === null) - (y === null);
    return (x < y ? -1 : x > y ? 1 : 0) * (up ? 1 : -1); }).forEach(r => body.appendChild(r));
}));
"""


@dataclasses.dataclass
class _Scores:
    """The scored videos' scores per key ("overall" and each dimension), and their (model, human) pairs and
    SRCC/PLCC for the keys with at least 3 human scores: computed once for the summary and the plots."""

    model: dict[str, list[float]]
    pairs: dict[str, list[tuple[float, float]]]
    corr: dict[str, tuple[float, float]]

    @classmethod
    def of(cls, results: list[tuple[VideoScore, dict | None]]) -> "_Scores":
        scored = [(s, h or {}) for s, h in results if s.ok]
        keys = ["overall", *_ordered({d for s, _ in scored for d in s.dimensions})] if scored else []
        model = {k: [s.overall if k == "overall" else s.dimensions.get(k, math.nan) for s, _ in scored] for k in keys}
        pairs = {k: xy for k, v in model.items() if len(xy := _with_human(v, [h for _, h in scored], k)) >= 3}
        return cls(model, pairs, {k: _correlations(*np.array(xy).T) for k, xy in pairs.items()})


def _summary(results: list[tuple[VideoScore, dict | None]], scores: _Scores, text: str | None) -> str:
    """Counts, the mean of every score over the scored videos, agreement with humans where known."""
    scored = sum(s.ok for s, _ in results)
    parts = [f"<p class='muted'>{len(results)} video(s): {scored} scored, {len(results) - scored} failed.</p>"]
    if scores.model:
        cells = "".join(f"<tr><td>{html.escape(k)}</td><td class='num'>{np.nanmean(v):.3f}</td></tr>"
                        for k, v in scores.model.items())
        parts.append(f"<table class='corr'><thead><tr><th>score</th><th>mean</th></tr></thead><tbody>{cells}</tbody></table>")
    if scores.pairs:
        parts += ["<h2>Model vs human</h2>", _correlation_table(scores.pairs, scores.corr)]
    if text:
        parts.append(f"<h2>Agreement with humans</h2><pre>{html.escape(text)}</pre>")
    return "<div class='plots'><h2>Summary</h2>" + "\n".join(parts) + "</div>"


def _video_table(results: list[tuple[VideoScore, dict | None]]) -> str:
    """One row per video (scores, human overall, error), sortable by any column; names link to the cards."""
    dims = _ordered({d for s, _ in results for d in s.dimensions})
    human = any(h and "overall" in h for _, h in results)
    header = ["video", "overall", *dims] + (["human overall"] if human else []) + ["error"]
    rows = []
    for i, (score, h) in enumerate(results):
        values = [score.overall, *(score.dimensions.get(d, math.nan) for d in dims)]
        values += [(h or {}).get("overall", math.nan)] if human else []
        cells = [f"<td><a href='#video-{i}'>{html.escape(Path(score.video).name or score.video)}</a></td>"]
        cells += [f"<td class='num' data-v='{v}'>{'' if math.isnan(v) else f'{v:.3f}'}</td>" for v in values]
        cells.append(f"<td class='error'>{html.escape(score.error or '')}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    head = "".join(f"<th title='click to sort'>{html.escape(h)}</th>" for h in header)
    return (f"<div class='plots'><h2>Videos</h2><table class='sortable'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div>")


# ---- one card per video -------------------------------------------------------------------------


def _card(score: VideoScore, human: dict | None, frames: int, index: int = 0) -> str:
    """The section of one video: name, prompt, frame strip, error or scores, questions."""
    human = human or {}
    parts = [f"<h2 id='video-{index}'>{html.escape(Path(score.video).name or score.video)}</h2>",
             f"<div class='muted'>{html.escape(score.video)}</div>",
             f"<p><b>Prompt:</b> {html.escape(score.prompt)}</p>", _strip(score.video, frames)]
    if not score.ok:
        parts.append(f"<p class='error'>Scoring failed: {html.escape(score.error)}</p>")
    else:
        parts.append(_bar("overall", score.overall, human.get("overall"), total=True))
        parts += [_bar(d, score.dimensions[d], human.get(d)) for d in _ordered(score.dimensions)]
        parts.append(_questions_table(score))
    return "<section class=\"card\">\n" + "\n".join(parts) + "\n</section>"


def _strip(video: str, frames: int) -> str:
    """The video's frames side by side as one PNG, or a short note when it cannot be read."""
    from PIL import Image

    try:
        clip = load_video(video, fps=STRIP_FPS, max_frames=frames, max_pixels=STRIP_MAX_PIXELS, patch_factor=2)
    except (ValueError, ImportError, OSError, RuntimeError) as err:
        return f"<p class='note'>Frames unavailable: {html.escape(str(err))}</p>"
    tiles = clip.frames.permute(0, 2, 3, 1).numpy()
    gap = np.full((tiles.shape[1], 2, 3), 255, dtype=np.uint8)
    row = np.concatenate([x for tile in tiles for x in (tile, gap)][:-1], axis=1)
    buffer = io.BytesIO()
    Image.fromarray(row).save(buffer, format="PNG")
    return f"<img class='strip' alt='frames of {html.escape(clip.name)}' src='{_data_uri(buffer.getvalue())}'>"


def _bar(label: str, value: float, human: float | None = None, total: bool = False) -> str:
    """A horizontal bar for a score in [0, 1], red to green, with a black tick at the human score."""
    ok = value is not None and math.isfinite(value)
    width = min(max(value, 0.0), 1.0) * 100 if ok else 0.0
    fill = f"<span class='fill' style='width:{width:.1f}%;background:hsl({width * 1.2:.0f},65%,48%)'></span>"
    text = f"{value:.3f}" if ok else "n/a"
    if human is not None and math.isfinite(human):
        h = min(max(human, 0.0), 1.0)
        fill += f"<span class='human' title='human {human:.3f}' style='left:calc({h * 100:.1f}% - {h * 3:.1f}px)'></span>"
        text += f" (human {human:.2f})"
    return (f"<div class='bar{' total' if total else ''}'><span class='label'>{html.escape(label)}</span>"
            f"<span class='track'>{fill}</span><span class='value'>{text}</span></div>")


def _questions_table(score: VideoScore) -> str:
    """The table of answered questions; a reason column only when some question has a reason."""
    reasons = any(q.reason for q in score.questions)
    header = ["dimension", "+/-", "question", "answer", "P(Yes)", "entity score"] + (["reason"] if reasons else [])
    rows = []
    for q in score.questions:
        cells = [html.escape(q.dimension), "+" if q.positive else "-", html.escape(q.question),
                 html.escape(q.answer), f"{q.p_yes:.3f}", f"{q.score:.3f}"] + ([html.escape(q.reason or "")] if reasons else [])
        rows.append("<tr>" + "".join(f"<td class='num'>{c}</td>" if i in (4, 5) else f"<td>{c}</td>"
                                     for i, c in enumerate(cells)) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in header)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


# ---- plots over the whole set -------------------------------------------------------------------


def _plots(scores: _Scores) -> str:
    """Score histograms, and model-vs-human scatter plots when at least 3 videos have human scores."""
    if not scores.model:
        return "<div class='plots'><p class='note'>No video was scored; nothing to plot.</p></div>"
    parts = ["<h2>Score distributions</h2>", f"<img alt='score histograms' src='{_data_uri(_histograms(scores.model))}'>"]
    if scores.pairs:
        parts += ["<h2>Model vs human</h2>",  # the SRCC/PLCC table is in the summary
                  f"<img alt='model vs human scatter plots' src='{_data_uri(_scatters(scores.pairs, scores.corr))}'>"]
    return "<div class='plots'>" + "\n".join(parts) + "</div>"


def _with_human(model: list[float], human: list[dict], key: str) -> list[tuple[float, float]]:
    """(model, human) score pairs of `key` where both are finite."""
    pairs = [(m, h.get(key, math.nan)) for m, h in zip(model, human)]
    return [(m, h) for m, h in pairs if math.isfinite(m) and math.isfinite(h)]


def _correlation_table(pairs: dict, corr: dict) -> str:
    """SRCC and PLCC per score as an HTML table (the same numbers as the scatter titles)."""
    rows = "".join(f"<tr><td>{html.escape(key)}</td><td class='num'>{len(pairs[key])}</td>"
                   f"<td class='num'>{srcc:.3f}</td><td class='num'>{plcc:.3f}</td></tr>" for key, (srcc, plcc) in corr.items())
    head = "".join(f"<th>{h}</th>" for h in ("score", "videos", "SRCC", "PLCC"))
    return f"<table class='corr'><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _histograms(model: dict[str, list[float]]) -> bytes:
    """One figure, a histogram of the finite scores per key, on [0, 1]."""
    fig, axes = figure(len(model))
    for ax, (key, values) in zip(axes, model.items()):
        ax.hist([v for v in values if math.isfinite(v)], bins=10, range=(0, 1), color="#3b7dd8", edgecolor="white")
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("model score")
        ax.locator_params(axis="y", integer=True)
    return png(fig)


def _scatters(pairs: dict[str, list[tuple[float, float]]], corr: dict[str, tuple[float, float]]) -> bytes:
    """One figure, model vs human per key, with SRCC and PLCC in each title."""
    fig, axes = figure(len(pairs))
    for ax, (key, xy) in zip(axes, pairs.items()):
        x, y = np.array(xy).T
        srcc, plcc = corr[key]
        ax.scatter(x, y, s=22, color="#d8573b", alpha=0.8)
        ax.locator_params(axis="x", nbins=5)
        ax.set_title(f"{key}\nSRCC {srcc:.3f}  PLCC {plcc:.3f}", fontsize=10)
        ax.set_xlabel("model score")
        ax.set_ylabel("human score")
    return png(fig)


def _correlations(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Spearman's and Pearson's correlation (`finger_reward.metrics`); NaN when either side is constant."""
    return srcc(x, y), plcc(x, y)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _ordered(keys) -> list[str]:
    """Dimension ids in the paper's order, then any others sorted."""
    keys = set(keys)
    return [d for d in DIMENSIONS if d in keys] + sorted(keys - set(DIMENSIONS))
