"""The HTML report: built from real scores of real synthetic clips, parsed, its images decoded, rendered."""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from finger_reward.report import load_results, write_report
from finger_reward.results import VideoScore
from finger_reward.reward import FingerReward
from finger_reward.synthetic import DEFECTS, make_world

BLANK_STD = 8.0


@pytest.fixture(scope="module")
def results_path(tiny_model_dir, tmp_path_factory):
    """RESULTS.jsonl: every clip of a one-scene world with human scores, a missing video and a failure."""
    root = tmp_path_factory.mktemp("report")
    world = make_world(root / "world", num_scenes=1)
    scores = FingerReward.from_pretrained(tiny_model_dir, questions=world.bank_path).score(
        [c.path for c in world.clips], [c.prompt for c in world.clips])
    lines = []
    for clip, score in zip(world.clips, scores):
        human = {d: float(clip.defect != defect) for d, defect in DEFECTS.items()}
        human["overall"] = 1.0 if clip.defect is None else 0.4
        lines.append({**score.to_dict(), "human": human})
    lines.append({**scores[0].to_dict(), "video": str(root / "missing.mp4")})
    lines.append(VideoScore.failed(str(world.clips[1].path), world.clips[1].prompt, "decoder <exploded> & gave up").to_dict())
    path = root / "results.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def report(results_path):
    """The written report: (results, path, page text)."""
    results = load_results(results_path)
    out = write_report(results, results_path.with_name("report.html"))
    return results, out, out.read_text(encoding="utf-8")


class _Page(HTMLParser):
    """Collects card sections and image sources; fails on unbalanced sections."""

    def __init__(self):
        super().__init__()
        self.cards, self.strips, self.images, self.depth = 0, 0, [], 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self.depth += 1
            self.cards += attrs.get("class") == "card"
        if tag == "img":
            self.images.append(attrs["src"])
            self.strips += attrs.get("class") == "strip"

    def handle_endtag(self, tag):
        self.depth -= tag == "section"
        assert self.depth >= 0, "unbalanced </section>"


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    page.close()
    assert page.depth == 0
    return page


def _decode(src: str) -> np.ndarray:
    assert src.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))


def test_load_results_keeps_every_line(results_path, report):
    results = report[0]
    assert len(results) == len(results_path.read_text().splitlines()) == 8
    assert all(h is not None and "overall" in h for _, h in results[:6])
    assert results[-1][0].error == "decoder <exploded> & gave up" and results[-1][1] is None
    first = json.loads(results_path.read_text().splitlines()[0])
    assert results[0][0].questions and {**results[0][0].to_dict(), "human": results[0][1]} == first


def test_one_card_per_result_with_questions_and_errors(report):
    results, _, text = report
    assert _parse(text).cards == text.count('class="card"') == len(results)
    for score, _ in results:
        for q in score.questions:
            assert html.escape(q.question) in text
    assert html.escape("decoder <exploded> & gave up") in text and "<exploded>" not in text
    assert text.count("Frames unavailable") == 1
    assert "SRCC" in text and "PLCC" in text


def test_page_is_self_contained(report):
    text = report[2]
    assert "http://" not in text and "https://" not in text
    assert "<link" not in text and "<script src" not in text  # the one script (table sorting) is inline
    assert text.count("<script>") == 1


def test_summary_opens_the_page_with_counts_means_and_agreement(report):
    results, _, text = report
    summary = text[text.index("<h2>Summary</h2>"):text.index("<h2>Videos</h2>")]
    assert text.index("<h2>Summary</h2>") < text.index("<section")
    scored = [s for s, _ in results if s.ok]
    assert f"{len(results)} video(s): {len(scored)} scored, {len(results) - len(scored)} failed." in summary
    mean = sum(s.overall for s in scored) / len(scored)
    assert f"<td>overall</td><td class='num'>{mean:.3f}</td>" in summary
    assert "SRCC" in summary and "PLCC" in summary  # six results carry human scores


def test_video_table_has_a_sortable_row_per_result(report):
    results, _, text = report
    table = text[text.index("<table class='sortable'>"):]
    table = table[:table.index("</table>")]
    assert table.count("<tr>") == len(results) + 1
    assert "human overall" in table and "title='click to sort'" in table
    for i, (score, _) in enumerate(results):  # each name links to its card, each score sorts by its value
        assert f"href='#video-{i}'" in table and f"id='video-{i}'" in text
        if score.ok:
            assert f"data-v='{score.overall}'" in table
    assert "decoder &lt;exploded&gt; &amp; gave up" in table  # the failed video's error, escaped


def test_images_are_embedded_pngs_and_not_blank(report):
    results, _, text = report
    page = _parse(text)
    # a strip per readable video (6 clips + 1 failed one whose file exists), histograms, scatters
    assert page.strips == 7 and len(page.images) == 7 + 2
    for src in page.images:
        assert _decode(src).std() > BLANK_STD


def test_strip_has_frames_per_strip_frames(results_path, tmp_path):
    results = load_results(results_path)[:1]
    text = write_report(results, tmp_path / "r.html", frames_per_strip=3).read_text()
    strip = _decode(_parse(text).images[-1])
    assert strip.shape[1] == 3 * 96 + 2 * 2 and strip.shape[0] == 64


def test_no_scatter_without_enough_human_scores(results_path, tmp_path):
    results = [(score, None) for score, _ in load_results(results_path)]
    results[0] = (results[0][0], {"overall": 0.5})
    text = write_report(results, tmp_path / "r.html", title="A <b>title</b>").read_text()
    assert "SRCC" not in text and "score histograms" in text
    assert "A &lt;b&gt;title&lt;/b&gt;" in text


def test_reasons_get_a_column_when_present(results_path, tmp_path):
    score = load_results(results_path)[0][0]
    reasoned = [dataclasses.replace(q, reason=f"<why> {i}") for i, q in enumerate(score.questions)]
    with_reason = dataclasses.replace(score, questions=reasoned)
    without = write_report([(score, None)], tmp_path / "a.html").read_text()
    text = write_report([(with_reason, None)], tmp_path / "b.html").read_text()
    assert "<th>reason</th>" in text and "<th>reason</th>" not in without
    assert all(f"&lt;why&gt; {i}" in text for i in range(len(score.questions)))


def test_frames_per_strip_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="frames_per_strip"):
        write_report([], tmp_path / "r.html", frames_per_strip=0)


@pytest.mark.parametrize("bad, problem", [
    ("{not json", "Expecting property name"),
    ("[1, 2]", "JSON object"),
    ('{"video": "a.mp4", "prompt": "p"}', "overall"),
    ('{"video": "a.mp4", "prompt": "p", "overall": 0.5, "human": [1]}', "human"),
    ('{"video": "a.mp4", "prompt": "p", "overall": 0.5, "human": {"overall": "high"}}', "high"),
])
def test_load_results_errors_name_the_line(tmp_path, bad, problem):
    good = json.dumps(VideoScore(video="a.mp4", prompt="p", overall=0.5).to_dict())
    path = tmp_path / "results.jsonl"
    path.write_text(f"{good}\n\n{bad}\n{good}\n")
    with pytest.raises(ValueError, match=rf"results\.jsonl, line 3: .*{problem}"):
        load_results(path)


def test_import_does_not_import_matplotlib():
    code = "import sys, finger_reward.report; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_renders_in_headless_chromium(report, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium not installed: apt-get install chromium")
    shot = tmp_path / "report.png"
    subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         f"--screenshot={shot}", "--window-size=1200,2000", report[1].resolve().as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2000, 1200)
    assert pixels.std() > BLANK_STD
