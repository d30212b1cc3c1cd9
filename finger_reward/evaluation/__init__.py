"""Evaluation data: FingER-test and the public benchmarks of FingER Sec. 4.1, loaded from local files.

    from finger_reward.evaluation import load_benchmark, human_scores
    bench = load_benchmark("genai", "data/GenAI-Bench-800")   # detects the rating or the vote form
    bench.kind, bench.note, bench.items[0]

FingER-test gives answered questions (Acc, and SRCC/PLCC through `human_scores`); GenAI-Bench-Video
gives rated videos (SRCC/PLCC); MonetBench, GenAI-Bench arena votes and VideoGen-RewardBench give
preference pairs (tau/diff pairwise accuracy). Videos named by URL are located through a video map
(`load_video_map`: URL or file name -> local path).
"""

from finger_reward.evaluation.loaders import (
    genai_bench_form,
    human_scores,
    load_benchmark,
    load_finger_test,
    load_genai_bench_ratings,
)
from finger_reward.evaluation.pairs import load_genai_bench_pairs, load_preference_pairs
from finger_reward.evaluation.records import (
    AnsweredQuestion,
    Benchmark,
    BenchmarkError,
    RatedVideo,
    VideoPair,
)
from finger_reward.evaluation.tables import load_video_map

__all__ = [
    "AnsweredQuestion",
    "Benchmark",
    "BenchmarkError",
    "RatedVideo",
    "VideoPair",
    "genai_bench_form",
    "human_scores",
    "load_benchmark",
    "load_finger_test",
    "load_genai_bench_pairs",
    "load_genai_bench_ratings",
    "load_preference_pairs",
    "load_video_map",
]
