"""FingerVideoReward called as TRL calls it, and inside a real GRPOTrainer run on CPU."""

import asyncio
import inspect
import logging
import math
import pickle

import pytest

from finger_reward import FingerReward
from finger_reward.integrations.trl import AsyncFingerVideoReward, FingerVideoReward
from finger_reward.rewards import completion_text
from finger_reward.serve import FingerRewardClient
from finger_reward.synthetic import COLORS, Scene, render

ORIGINAL = "a red circle moves from left to right"


def text_to_video(text: str):
    """A procedural 'generator': the first colour word of the text decides the circle's colour."""
    if "boom" in text:
        raise RuntimeError("the generator crashed on this prompt")
    colour = next((w for w in text.lower().split() if w in COLORS), "white")
    return render(Scene(colour, "circle", "left to right"), num_frames=8, height=56, width=56)


class RecordingReward(FingerReward):
    """A real FingerReward that keeps what it scored, so a test can compare TRL's logs with it."""

    def score(self, videos, prompts):
        results = super().score(videos, prompts)
        self.calls = [*getattr(self, "calls", []), results]
        return results


@pytest.fixture(scope="module")
def reward(tiny_model_dir):
    return FingerReward.from_pretrained(tiny_model_dir)


def test_called_exactly_as_trl_calls_it(reward):
    from trl import GRPOTrainer

    source = inspect.getsource(GRPOTrainer._calculate_rewards)
    assert "prompts=prompts, completions=completions, completion_ids=completion_ids_list, **reward_kwargs" in source
    for key in ("trainer_state", "log_extra", "log_metric"):
        assert f'reward_kwargs["{key}"]' in source
    extra, metrics = {}, {}
    fn = FingerVideoReward(reward, video_fn=text_to_video)
    rewards = fn(prompts=["p1", "p2", "p3"], completions=["a red ball", "a blue ball", "boom"], completion_ids=[[1], [2], [3]],
                 original_prompt=[ORIGINAL] * 3, other_column=[0, 1, 2], trainer_state=None,
                 log_extra=lambda column, values: extra.setdefault(column, values),
                 log_metric=lambda name, value: metrics.setdefault(name, value))
    direct = reward([text_to_video("a red ball"), text_to_video("a blue ball")], ORIGINAL)
    assert rewards[:2] == pytest.approx(direct) and rewards[2] is None
    assert len(extra["finger/text_alignment"]) == 3 and extra["finger/text_alignment"][2] is None
    assert 0 <= metrics["finger/visual_quality"] <= 1


def test_failed_generation_fails_alone_with_a_clear_log(reward, caplog):
    fn = FingerVideoReward(reward, video_fn=text_to_video)
    with caplog.at_level(logging.WARNING, logger="finger_reward.integrations.trl"):
        rewards = fn(prompts=["p"] * 2, completions=["boom now", "green"], original_prompt=[ORIGINAL] * 2)
    assert rewards[0] is None and isinstance(rewards[1], float)
    assert "sample 0 gets no reward: video generation failed: RuntimeError: the generator crashed" in caplog.text


def test_chat_completions_and_missing_column(reward):
    assert completion_text([{"role": "assistant", "content": "a red kite"}]) == "a red kite"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "a "}, {"type": "text", "text": "kite"}]}]) == "a kite"
    fn = FingerVideoReward(reward, video_fn=text_to_video)
    with pytest.raises(KeyError, match="no column 'original_prompt'.*columns passed: user_prompt"):
        fn(prompts=["p"], completions=["x"], user_prompt=[ORIGINAL])
    with pytest.raises(ValueError, match="exactly one of pipeline"):
        FingerVideoReward(reward)


def test_picklable_name_and_async():
    from trl.trainer.utils import get_callable_name, is_async_callable

    fn = FingerVideoReward(FingerRewardClient("http://127.0.0.1:9"), video_fn=text_to_video)
    clone = pickle.loads(pickle.dumps(fn))
    assert get_callable_name(clone) == "finger_reward" and clone.video_fn is text_to_video
    assert not is_async_callable(fn)
    assert is_async_callable(AsyncFingerVideoReward(fn.reward, video_fn=text_to_video))


def test_async_variant_gives_the_same_rewards(reward):
    kwargs = dict(prompts=["p"] * 2, completions=["a red ball", "boom"], original_prompt=[ORIGINAL] * 2)
    sync = FingerVideoReward(reward, video_fn=text_to_video)(**kwargs)
    async_ = asyncio.run(AsyncFingerVideoReward(reward, video_fn=text_to_video)(**kwargs))
    assert async_[0] == pytest.approx(sync[0]) and async_[1] is None


@pytest.fixture(scope="module")
def tiny_policy_dir(tmp_path_factory):
    """A tiny random chat LM (the prompt rewriter), saved so TRL can rebuild its reference model."""
    from finger_reward.tiny import make_tiny_chat_model

    return make_tiny_chat_model(tmp_path_factory.mktemp("policy"))


@pytest.mark.slow
def test_grpo_trainer_logs_finger_scores(tiny_model_dir, tiny_policy_dir, tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    recording = RecordingReward.from_pretrained(tiny_model_dir)
    dataset = Dataset.from_dict({
        "prompt": [[{"role": "user", "content": f"Rewrite for a video model: {p}"}] for p in [ORIGINAL, "a blue square"] * 4],
        "original_prompt": [ORIGINAL, "a blue square"] * 4,
    })
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
                      max_steps=2, logging_steps=1, report_to="none", beta=0.04, learning_rate=1e-4, use_cpu=True,
                      save_strategy="no", bf16=False)
    reward_fn = FingerVideoReward(recording, video_fn=text_to_video)
    trainer = GRPOTrainer(model=str(tiny_policy_dir), reward_funcs=[reward_fn], args=args, train_dataset=dataset)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "rewards/finger_reward/mean" in h]
    assert len(logged) == 2 and len(recording.calls) == 2
    for entry, results in zip(logged, recording.calls):
        assert len(results) == 4
        assert entry["rewards/finger_reward/mean"] == pytest.approx(sum(r.overall for r in results) / 4, abs=1e-5)
        assert 0 <= entry["finger/text_alignment"] <= 1
    assert not any(math.isnan(h.get("loss", 0.0)) for h in trainer.state.log_history)
