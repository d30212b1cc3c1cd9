"""Benchmark loaders on fixtures written in the published layouts, and their errors for bad records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finger_reward.evaluation import (
    AnsweredQuestion,
    BenchmarkError,
    RatedVideo,
    VideoPair,
    genai_bench_form,
    human_scores,
    load_benchmark,
    load_finger_test,
    load_genai_bench_pairs,
    load_genai_bench_ratings,
    load_preference_pairs,
    load_video_map,
)
from finger_reward.questions import Question

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"


# ---- FingER-test --------------------------------------------------------------------------------


def test_finger_test_loads_answered_questions_with_paths_under_the_file_directory():
    bench = load_finger_test(FIXTURES / "finger_test.jsonl")
    assert (bench.name, bench.kind, len(bench.items)) == ("finger-test", "questions", 5)
    assert all(isinstance(item, AnsweredQuestion) for item in bench.items)
    assert [item.answer for item in bench.items] == ["Yes", "Yes", "No", "No", "No"]
    assert bench.items[0].video == str(FIXTURES / "videos" / "clip_000.mp4")
    assert bench.items[4].question.positive is False  # written as 0, the paper's q_stat
    assert "FingER-test" in bench.note


def test_finger_test_resolves_videos_against_an_explicit_root(tmp_path):
    bench = load_finger_test(FIXTURES / "finger_test.jsonl", video_root=tmp_path)
    assert {item.video for item in bench.items} == {
        str(tmp_path / "videos" / "clip_000.mp4"), str(tmp_path / "videos" / "clip_001.mp4")
    }


def _answered(video: str, dimension: str, positive: bool, answer: str) -> AnsweredQuestion:
    question = Question("a prompt", dimension, "cat", f"{dimension} {positive}?", positive)
    return AnsweredQuestion(question=question, video=video, answer=answer)


def test_human_scores_applies_polarity_then_means_dimensions_then_overall():
    items = [
        _answered("v1", "visual_quality", True, "Yes"),     # good -> 1
        _answered("v1", "visual_quality", False, "Yes"),    # defect seen -> 0
        _answered("v1", "text_alignment", False, "No"),     # no defect -> 1
        _answered("v2", "dynamic_degree", True, "No"),      # static -> 0
        _answered("v2", "dynamic_degree", True, "Yes"),     # -> 1
        _answered("v2", "factual_consistency", False, "Yes"),  # -> 0
    ]
    scores = human_scores(items)
    assert scores["v1"] == pytest.approx({"visual_quality": 0.5, "text_alignment": 1.0, "overall": 0.75})
    assert scores["v2"] == pytest.approx({"dynamic_degree": 0.5, "factual_consistency": 0.0, "overall": 0.25})


def test_human_scores_on_the_fixture():
    scores = human_scores(load_finger_test(FIXTURES / "finger_test.jsonl").items)
    assert scores[str(FIXTURES / "videos" / "clip_000.mp4")]["overall"] == pytest.approx(0.75)
    assert scores[str(FIXTURES / "videos" / "clip_001.mp4")] == pytest.approx(
        {"dynamic_degree": 0.0, "factual_consistency": 1.0, "overall": 0.5}
    )


# ---- GenAI-Bench, both forms ----------------------------------------------------------------------


def test_genai_bench_ratings_one_video_per_prompt_and_generator():
    folder = FIXTURES / "GenAI-Bench-800"
    bench = load_genai_bench_ratings(folder)
    assert (bench.name, bench.kind, len(bench.items)) == ("genai-bench-video-ratings", "ratings", 11)
    assert all(isinstance(item, RatedVideo) for item in bench.items)
    by_video = {item.video: item for item in bench.items}
    gen2 = by_video[str(folder / "Gen2" / "00001.mp4")]
    assert (gen2.model, gen2.human) == ("Gen2", {"overall": pytest.approx(4.0)})
    assert gen2.prompt.startswith("Two cups")
    assert str(folder / "Modelscope" / "00002.mp4") not in by_video  # that prompt has no Modelscope video
    assert "GenAI-Bench-Video rating form" in bench.note and "Floor33" in bench.note
    assert load_genai_bench_ratings(folder / "genai_video.json").items == bench.items


# The fixture's 4th row names its left video by URL, as the published parquet may.
ARENA_MAP = {"left_003.mp4": "/data/arena/downloads/left_003.mp4"}


def test_genai_bench_pairs_keeps_the_four_votes():
    bench = load_genai_bench_pairs(FIXTURES / "genai_bench_video_pairs.jsonl", video_root="/data/arena",
                                   video_map=ARENA_MAP)
    assert (bench.name, bench.kind) == ("genai-bench-video-pairs", "pairs")
    assert [pair.label for pair in bench.items] == [1, -1, 0, 0]  # tau/diff: both kinds of tie are 0
    assert [pair.vote for pair in bench.items] == ["leftvote", "rightvote", "tievote", "bothbad_vote"]
    assert all(isinstance(pair, VideoPair) and pair.dimension == "overall" for pair in bench.items)
    assert bench.items[0].video_a == "/data/arena/videos/left_000.mp4"
    assert bench.items[3].video_a == "/data/arena/downloads/left_003.mp4"  # the URL, through the map by file name
    assert "1 tievote, 1 bothbad_vote" in bench.note


def test_a_url_video_without_a_map_says_how_to_supply_local_files(tmp_path):
    with pytest.raises(BenchmarkError, match=r"line 4: field 'left_video': 'https://example.org/videos/left_003.mp4' "
                                             r"is a URL.*--video-map FILE"):
        load_genai_bench_pairs(FIXTURES / "genai_bench_video_pairs.jsonl")
    # A map read from a file (CSV rows here; a JSON object works too), keyed by the full URL.
    video_map = tmp_path / "map.csv"
    video_map.write_text("url,path\nhttps://example.org/videos/left_003.mp4,downloads/l3.mp4\n")
    bench = load_benchmark("genai", FIXTURES / "genai_bench_video_pairs.jsonl", video_map=load_video_map(video_map))
    assert bench.items[3].video_a == str(tmp_path / "downloads" / "l3.mp4")
    (tmp_path / "other.json").write_text(json.dumps({"something_else.mp4": "x.mp4"}))
    with pytest.raises(BenchmarkError, match="no entry for it or for its file name 'left_003.mp4'"):
        load_genai_bench_pairs(FIXTURES / "genai_bench_video_pairs.jsonl",
                               video_map=load_video_map(tmp_path / "other.json"))


def test_genai_bench_pairs_reads_a_parquet_export(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    rows = [json.loads(line) for line in (FIXTURES / "genai_bench_video_pairs.jsonl").read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "test-00000-of-00001.parquet")
    bench = load_genai_bench_pairs(tmp_path / "test-00000-of-00001.parquet", video_map=ARENA_MAP)
    assert [pair.label for pair in bench.items] == [1, -1, 0, 0]
    assert bench.items[1].video_b == str(tmp_path / "videos" / "right_001.mp4")


# ---- preference pairs ---------------------------------------------------------------------------


def test_videogen_rewardbench_csv_gives_one_pair_per_dimension():
    bench = load_preference_pairs(FIXTURES / "videogen-rewardbench.csv")
    assert (bench.name, bench.kind, len(bench.items)) == ("videogen-rewardbench", "pairs", 12)
    first = {pair.dimension: pair.label for pair in bench.items[:4]}
    assert first == {"overall": 1, "VQ": 1, "MQ": 0, "TA": -1}
    overall = [pair.label for pair in bench.items if pair.dimension == "overall"]
    assert overall == [1, -1, 0]
    assert bench.items[0].prompt == "A chef flips a pancake, then catches it in the pan."
    assert bench.items[0].video_a == str(FIXTURES / "videos" / "kling_0001.mp4")
    assert "VideoGen-RewardBench" in bench.note


def test_videogen_rewardbench_jsonl_matches_the_csv():
    from_csv = load_preference_pairs(FIXTURES / "videogen-rewardbench.csv", video_root="/v")
    from_jsonl = load_preference_pairs(FIXTURES / "videogen-rewardbench.jsonl", video_root="/v")
    assert from_jsonl.items == from_csv.items
    assert from_csv.items[5].video_b == "/v/videos/pika_0002.mp4"


def test_monetbench_prompt_under_its_readers_names_or_an_error_naming_the_columns(tmp_path):
    row = {"video1_path": "a.mp4", "video2_path": "b.mp4", "standard_answer": "video1"}
    for column in ("prompt", "caption", "text"):
        path = _lines(tmp_path / f"{column}.jsonl", {**row, column: "a red kite"})
        assert load_preference_pairs(path).items[0].prompt == "a red kite"
    path = _lines(tmp_path / "none.jsonl", {**row, "internal_id": 7})
    with pytest.raises(BenchmarkError, match="no prompt column; expected one of prompt, caption.*found video1_path, "
                                             "video2_path, standard_answer, internal_id"):
        load_preference_pairs(path)


def test_monetbench_pairs_and_explicit_name():
    bench = load_preference_pairs(FIXTURES / "monetbench.jsonl", name="monet")
    assert (bench.name, len(bench.items)) == ("monet", 3)
    assert [pair.label for pair in bench.items] == [1, -1, 0]
    assert "MonetBench" in bench.note
    assert load_preference_pairs(FIXTURES / "monetbench.jsonl").name == "monetbench"


def test_empty_or_invalid_labels_are_skipped_not_guessed(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("path_A,path_B,prompt,Overall,VQ,MQ,TA\na.mp4,b.mp4,p,A,,invalid,B\n")
    bench = load_preference_pairs(path)
    assert [(pair.dimension, pair.label) for pair in bench.items] == [("overall", 1), ("TA", -1)]


# ---- bad records name the file, the line or entry, and the field -------------------------------


def _lines(path: Path, *rows: dict) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


GOOD_QUESTION = {"prompt": "p", "dimension": "visual_quality", "entity": "e", "question": "q?", "positive": True,
                 "video": "a.mp4", "answer": "Yes"}


@pytest.mark.parametrize(
    ("change", "field"),
    [({"answer": "Maybe"}, "answer"), ({"answer": None}, "answer"), ({"video": ""}, "video"),
     ({"dimension": "aesthetics"}, "dimension")],
)
def test_finger_test_bad_line(tmp_path, change, field):
    path = _lines(tmp_path / "test.jsonl", GOOD_QUESTION, {**GOOD_QUESTION, **change})
    with pytest.raises(BenchmarkError) as err:
        load_finger_test(path)
    assert f"{path}, line 2" in str(err.value) and field in str(err.value)


def test_finger_test_line_that_is_not_json(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps(GOOD_QUESTION) + "\n\n{not json\n")
    with pytest.raises(BenchmarkError, match="line 3: not valid JSON"):
        load_finger_test(path)


def test_genai_ratings_bad_rating_names_entry_and_model(tmp_path):
    path = tmp_path / "genai_video.json"
    path.write_text(json.dumps({"00007": {"prompt": "p", "models": {"Gen2": [3, 7, 4]}}}))
    with pytest.raises(BenchmarkError) as err:
        load_genai_bench_ratings(path)
    assert "entry '00007'" in str(err.value) and "models.Gen2" in str(err.value) and str(path) in str(err.value)


def test_genai_pairs_bad_vote(tmp_path):
    row = {"prompt": "p", "left_video": "a.mp4", "right_video": "b.mp4", "vote_type": "upvote"}
    path = _lines(tmp_path / "votes.jsonl", row)
    with pytest.raises(BenchmarkError, match=r"votes.jsonl, line 1: field 'vote_type'"):
        load_genai_bench_pairs(path)


def test_csv_pairs_bad_label_and_missing_video_column(tmp_path):
    bad_label = tmp_path / "bad.csv"
    bad_label.write_text("path_A,path_B,prompt,Overall,VQ\na.mp4,b.mp4,p,A,C\n")
    with pytest.raises(BenchmarkError, match=r"bad.csv, line 2: field 'VQ'"):
        load_preference_pairs(bad_label)
    no_video = tmp_path / "novideo.csv"
    no_video.write_text("path_A,prompt,Overall\na.mp4,p,A\n")
    with pytest.raises(BenchmarkError, match=r"novideo.csv, line 2: field 'path_B or "):
        load_preference_pairs(no_video)


def test_pairs_without_any_label_column(tmp_path):
    path = _lines(tmp_path / "pairs.jsonl", {"prompt": "p", "video_a": "a.mp4", "video_b": "b.mp4"})
    with pytest.raises(BenchmarkError, match="line 1: no preference label"):
        load_preference_pairs(path)


# ---- dispatch -----------------------------------------------------------------------------------


def test_load_benchmark_dispatches_and_detects_the_genai_form():
    assert load_benchmark("finger", FIXTURES / "finger_test.jsonl").kind == "questions"
    assert genai_bench_form(FIXTURES / "GenAI-Bench-800") == "ratings"
    ratings = FIXTURES / "GenAI-Bench-800" / "genai_video.json"
    assert load_benchmark("genai", ratings).name == "genai-bench-video-ratings"
    assert load_benchmark("genai", FIXTURES / "genai_bench_video_pairs.jsonl", video_map=ARENA_MAP).name == "genai-bench-video-pairs"
    assert load_benchmark("pairs", FIXTURES / "videogen-rewardbench.csv").name == "videogen-rewardbench"
    assert load_benchmark("monetbench", FIXTURES / "videogen-rewardbench.csv").name == "monetbench"


def test_load_benchmark_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown benchmark 'vbench'.*finger.*genai.*pairs"):
        load_benchmark("vbench", FIXTURES / "finger_test.jsonl")


def test_missing_file_is_reported():
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_finger_test(FIXTURES / "nope.jsonl")
