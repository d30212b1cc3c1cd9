"""The prefetch pipeline: the next chunk is decoded while the model runs this one, in order, bounded, with timeouts."""

import math
import threading
import time

import pytest

from finger_reward import FingerReward, Question
from finger_reward.engine import TransformersEngine
from finger_reward.errors import BatchError, VideoError
from finger_reward.prefetch import PipelineStats, WorkerPool, pipeline
from tests.test_engine import QUESTIONS

PROMPT = "a red ball"


# ---- the pipeline on plain functions -------------------------------------------------------------


class Recorder:
    """`prepare` and `run` for `pipeline` that log when each item starts preparing and each chunk runs."""

    def __init__(self, prepare_s=0.0, run_s=0.0):
        self.events, self.lock = [], threading.Lock()
        self.prepare_s, self.run_s = prepare_s, run_s

    def log(self, *event):
        with self.lock:
            self.events.append(event)

    def prepare(self, item):
        self.log("prepare", item)
        time.sleep(self.prepare_s)
        if item % 5 == 3:
            raise ValueError(f"item {item} is bad")
        return item * 10

    def run(self, jobs):
        self.log("run", tuple(j if isinstance(j, int) else "err" for j in jobs))
        time.sleep(self.run_s)
        self.log("ran", len(jobs))
        return [j if isinstance(j, Exception) else j + 1 for j in jobs]


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_pipeline_keeps_order_and_puts_errors_in_place(workers):
    rec, stats = Recorder(), PipelineStats()
    chunks = list(pipeline(list(range(11)), rec.prepare, rec.run, chunk_size=4, workers=workers, timeout=None,
                           stats=stats))
    out = [o for chunk in chunks for o in chunk]
    assert [o if isinstance(o, int) else str(o) for o in out] == [
        f"item {i} is bad" if i in (3, 8) else i * 10 + 1 for i in range(11)
    ]
    assert list(map(len, chunks)) == [4, 4, 3] and (stats.videos, stats.chunks) == (11, 3)
    assert 0 <= stats.wait_s <= stats.wall_s and 0 <= stats.wait_share <= 1


def test_pipeline_prepares_one_chunk_ahead_and_no_further():
    rec = Recorder(prepare_s=0.02, run_s=0.15)
    list(pipeline(list(range(12)), rec.prepare, rec.run, chunk_size=3, workers=2, timeout=None))
    started, running, overlapped = 0, False, 0  # chunks handed to the model so far; is one running now
    for event in rec.events:
        if event[0] == "prepare":
            chunk = event[1] // 3
            # Bounded: while chunk k runs, nothing beyond k+1 starts; between runs, nothing beyond the next + 1.
            assert chunk <= (started if running else started + 1)
            overlapped += running and chunk == started
        else:
            started += event[0] == "run"
            running = event[0] == "run"
    assert overlapped > 0  # chunk k+1 was being prepared while chunk k ran


def test_pipeline_timeout_fails_one_item_and_replaces_its_worker():
    release = threading.Event()

    def prepare(item):
        if item == 1:
            release.wait(30)  # a decoder that hangs
        return item

    try:
        start = time.perf_counter()
        out = [o for chunk in pipeline(list(range(5)), prepare, list, chunk_size=2, workers=1, timeout=0.3,
                                       label=lambda i: f"clip{i}.mp4") for o in chunk]
        elapsed = time.perf_counter() - start
    finally:
        release.set()
    assert out[:1] + out[2:] == [0, 2, 3, 4]  # one worker: the items after the stuck one needed a new worker
    assert isinstance(out[1], VideoError) and "clip1.mp4" in str(out[1]) and "decode_timeout=0.3s" in str(out[1])
    assert elapsed < 10


def test_pipeline_joins_its_workers():
    # A decoding thread still alive at interpreter exit can abort the process (seen with decord + torch).
    before = set(threading.enumerate())
    list(pipeline(list(range(7)), Recorder().prepare, Recorder().run, chunk_size=2, workers=3, timeout=5))
    assert not [t for t in threading.enumerate() if t not in before and t.name.startswith("finger-prefetch")]


def test_worker_pool_arguments():
    with pytest.raises(ValueError, match="workers=0"):
        WorkerPool(0, None)
    with pytest.raises(ValueError, match="timeout=0"):
        WorkerPool(1, 0)
    with pytest.raises(ValueError, match="chunk_size=0"):
        next(pipeline([1], str, list, chunk_size=0, workers=0, timeout=None))


# ---- FingerReward.score through the pipeline -----------------------------------------------------


@pytest.fixture(scope="module")
def questions():
    return [Question(PROMPT, "visual_quality", "video", q, i % 2 == 0) for i, q in enumerate(QUESTIONS)]


class RecordingReward(FingerReward):
    """A real FingerReward that logs when each video starts preparing and when each chunk reaches the model."""

    def __init__(self, *args, hang: str | None = None, prepare_s: float = 0.0, **kw):
        super().__init__(*args, **kw)
        self.events, self.hang, self.prepare_s, self.release = [], hang, prepare_s, threading.Event()

    def _prepare_one(self, video, prompt, name, *args, **kw):
        self.events.append(("prepare", name))
        if name == self.hang:
            self.release.wait(30)
        time.sleep(self.prepare_s)
        return super()._prepare_one(video, prompt, name, *args, **kw)

    def _run_jobs(self, jobs):
        self.events.append(("run", [j.name if not isinstance(j, Exception) else "error" for j in jobs]))
        return super()._run_jobs(jobs)


def test_score_is_chunked_in_order_with_failures_in_place(tiny_model_and_processor, mp4_paths, questions, capsys):
    engine = TransformersEngine(*tiny_model_and_processor)
    videos = [mp4_paths[0], "missing.mp4", mp4_paths[1], b"not a video", mp4_paths[2]]
    reward = RecordingReward(engine, questions=questions, on_error="nan", prefetch=2, chunk_size=2, progress=True)
    results = reward.score(videos, PROMPT)
    assert [r.video for r in results] == [str(mp4_paths[0]), "missing.mp4", str(mp4_paths[1]), "#3 (bytes)",
                                          str(mp4_paths[2])]
    assert [math.isnan(r.overall) for r in results] == [False, True, False, True, False]
    assert "file not found" in results[1].error and "cannot be decoded" in results[3].error
    runs = [e[1] for e in reward.events if e[0] == "run"]
    assert runs == [[str(mp4_paths[0]), "error"], [str(mp4_paths[1]), "error"], [str(mp4_paths[2])]]
    assert (reward.stats.videos, reward.stats.chunks) == (5, 3) and 0 < reward.stats.wait_share < 1
    # The progress bar moves per chunk, not only at the end.
    err = capsys.readouterr().err
    assert "2/5" in err and "4/5" in err and "5/5" in err
    # Each video scores as it does alone.
    for video, result in zip(videos, results):
        if not math.isnan(result.overall):
            alone = FingerReward(engine, questions=questions, prefetch=0).score([video], PROMPT)[0]
            assert abs(alone.overall - result.overall) < 1e-5
            assert [q.p_yes for q in alone.questions] == pytest.approx([q.p_yes for q in result.questions], abs=1e-5)
    with pytest.raises(BatchError) as raised:
        FingerReward(engine, questions=questions, chunk_size=2).score(videos, PROMPT)
    assert sorted(raised.value.failures) == [1, 3] and isinstance(raised.value.failures[1], VideoError)


def test_score_iter_yields_each_chunk_in_order(tiny_model_and_processor, mp4_paths, questions):
    engine = TransformersEngine(*tiny_model_and_processor)
    videos = [mp4_paths[0], "missing.mp4", mp4_paths[1], mp4_paths[2]]
    reward = FingerReward(engine, questions=questions, chunk_size=3)  # on_error="raise" does not stop the stream
    chunks = reward.score_iter(videos, PROMPT)
    first = next(chunks)
    assert [r.video for r in first] == [str(mp4_paths[0]), "missing.mp4", str(mp4_paths[1])]
    assert reward.stats.chunks == 2 and reward.stats.wall_s > 0  # stats as the chunks come
    [last] = next(chunks)
    assert last.video == str(mp4_paths[2]) and last.error is None
    assert next(chunks, None) is None
    assert math.isnan(first[1].overall) and "file not found" in first[1].error
    whole = FingerReward(engine, questions=questions, on_error="nan").score(videos, PROMPT)
    assert [r.overall for r in first + [last]] == pytest.approx([r.overall for r in whole], abs=1e-5, nan_ok=True)


def test_score_to_file_streams_chunks_through_the_pipeline(tiny_model_and_processor, mp4_paths, questions, tmp_path):
    from finger_reward.scorefile import load_scores, score_to_file

    engine = TransformersEngine(*tiny_model_and_processor)
    reward = RecordingReward(engine, questions=questions, prefetch=1, chunk_size=16)
    keys = [(str(p), PROMPT) for p in mp4_paths] + [("missing.mp4", PROMPT)]
    results = score_to_file(reward, keys, tmp_path / "r.jsonl", chunk=2)
    # The file's chunk size wins over the reward's, and chunk 2 was decoding before chunk 1 reached the model.
    assert [e[1] for e in reward.events if e[0] == "run"] == [[str(mp4_paths[0]), str(mp4_paths[1])],
                                                             [str(mp4_paths[2]), "error"]]
    first_run = next(i for i, e in enumerate(reward.events) if e[0] == "run")
    assert ("prepare", str(mp4_paths[2])) in reward.events[:first_run]
    assert set(load_scores(tmp_path / "r.jsonl")) == set(keys) == set(results)
    assert "file not found" in results[("missing.mp4", PROMPT)].error


def test_score_decode_timeout_fails_only_that_video(tiny_model_and_processor, mp4_paths, questions):
    engine = TransformersEngine(*tiny_model_and_processor)
    hung = str(mp4_paths[1])
    reward = RecordingReward(engine, questions=questions, on_error="nan", prefetch=1, chunk_size=2,
                             decode_timeout=0.5, hang=hung)
    try:
        results = reward.score(list(mp4_paths), PROMPT)
    finally:
        reward.release.set()
    assert [math.isnan(r.overall) for r in results] == [False, True, False]
    assert "decode_timeout=0.5s" in results[1].error and hung in results[1].error


def test_prefetch_cuts_the_time_the_model_waits(tiny_model_and_processor, mp4_paths, questions):
    engine = TransformersEngine(*tiny_model_and_processor)
    videos = list(mp4_paths) * 2
    waits = {}
    for workers in (0, 2):
        reward = RecordingReward(engine, questions=questions, prefetch=workers, chunk_size=2, prepare_s=0.3)
        reward.score(videos, PROMPT)
        waits[workers] = reward.stats.wait_s
    assert waits[0] >= 6 * 0.3  # every decode in the model's thread
    assert waits[2] < waits[0] - 0.5  # only the first chunk (2 videos, 2 workers: ~0.3 s) must be waited for


def test_prepared_jobs_carry_the_processor_inputs(tiny_model_and_processor, mp4_paths, questions):
    engine = TransformersEngine(*tiny_model_and_processor)
    reward = FingerReward(engine, questions=questions)
    job = reward._prepare_one(mp4_paths[0], PROMPT, "clip", {}, with_inputs=True)
    assert job.inputs["input_ids"].shape[1] > job.clip.frames.shape[0]  # the prefix, video tokens included
    assert reward.prepare([mp4_paths[0]], [PROMPT])[0].inputs is None  # the service's prepare stays light


@pytest.mark.parametrize("option, value", [("prefetch", -1), ("prefetch", 1.5), ("chunk_size", 0),
                                           ("decode_timeout", 0)])
def test_pipeline_options_are_checked(tiny_model_and_processor, option, value):
    with pytest.raises(ValueError, match=option):
        FingerReward(TransformersEngine(*tiny_model_and_processor), **{option: value})
