"""FingER in verl 0.9.1's reward loop: a real FingER service on 127.0.0.1 (tiny model), verl's own loader,
DataProto and RewardLoopWorker on CPU, and configs/verl_finger_reward.yaml merged into verl's trainer config."""

import asyncio
import inspect
import logging
import math
import pickle
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

pytest.importorskip("verl", reason="needs the verl extra: pip install 'finger-reward[verl]'")

from omegaconf import OmegaConf  # noqa: E402  (a verl dependency)

import finger_reward.integrations.verl as finger_verl  # noqa: E402
from finger_reward import FingerReward, Question, QuestionBank  # noqa: E402
from finger_reward.questions import DIMENSIONS  # noqa: E402
from finger_reward.serve import FingerRewardClient, ServeConfig, ServiceError  # noqa: E402
from finger_reward.serve.local import LocalServer  # noqa: E402

import verl  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.experimental.reward_loop.reward_loop import RewardLoopWorker, migrate_legacy_reward_impl  # noqa: E402
from verl.experimental.reward_loop.reward_manager import NaiveRewardManager, get_reward_manager_cls  # noqa: E402
from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase  # noqa: E402
from verl.trainer.ppo.reward import _call_with_kwargs, get_custom_reward_fn, resolve_reward_manager_cls  # noqa: E402

PROMPTS = ["a red circle moves right", "a blue square stays still", "a dog runs", "a cat sleeps"]
YAML = Path(__file__).resolve().parents[1] / "configs" / "verl_finger_reward.yaml"
VERL_DEFAULTS = Path(verl.__file__).parent / "trainer" / "config" / "_generated_ppo_trainer.yaml"


@pytest.fixture(scope="module")
def reward(tiny_model_dir, tmp_path_factory):
    questions = [Question(p, dim, "thing", f"Q{k} about {p} in {dim}?", k % 2 == 0)
                 for p in PROMPTS for k, dim in enumerate(DIMENSIONS)]
    bank = QuestionBank(questions).to_jsonl(tmp_path_factory.mktemp("verl") / "bank.jsonl")
    return FingerReward.from_pretrained(tiny_model_dir, questions=bank)


@pytest.fixture(scope="module")
def server(reward):
    with LocalServer(reward, ServeConfig(port=0, token="secret", max_wait_ms=5, max_batch_size=16)) as running:
        yield running


@pytest.fixture(scope="module")
def samples(mp4_paths):
    """Eight (video, original prompt) pairs, as a step of a prompt-rewriting policy would produce."""
    return [(str(mp4_paths[i % 3]), PROMPTS[i % 4]) for i in range(8)]


@pytest.fixture(scope="module")
def direct(reward, samples):
    """FingerReward.score on each pair, without the service."""
    return {pair: reward.score([pair[0]], pair[1])[0] for pair in set(samples)}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def service_env(server, monkeypatch):
    """The service as the configs find it: FINGER_REWARD_URL / FINGER_REWARD_TOKEN (the YAML leaves them null)."""
    monkeypatch.setenv("FINGER_REWARD_URL", server.url)
    monkeypatch.setenv("FINGER_REWARD_TOKEN", "secret")


def score_requests(server) -> int:
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": "Bearer secret"}).text
    return sum(int(float(n)) for n in re.findall(r'^finger_requests_total\{status="\d+"\} ([0-9.e+]+)$', text, re.M))


def verl_config(tiny_model_dir, excerpt: dict, **reward_overrides):
    """verl's full trainer config + an excerpt + overrides, migrated as verl's trainer does at start-up."""
    config = OmegaConf.merge(OmegaConf.load(VERL_DEFAULTS), excerpt,
                             {"actor_rollout_ref": {"model": {"path": str(tiny_model_dir)}}},
                             {"reward": reward_overrides})
    return migrate_legacy_reward_impl(config)


def manager_excerpt() -> dict:
    return OmegaConf.to_container(OmegaConf.load(YAML))


def alternative_excerpt() -> dict:
    """The commented `custom_reward_function` alternative of the YAML, uncommented."""
    text = YAML.read_text()
    block = text.split("# >>> custom_reward_function alternative\n")[1].split("# <<<")[0]
    return OmegaConf.to_container(OmegaConf.create("\n".join(line[2:] for line in block.splitlines())))


def make_batch(tokenizer, rows: list[dict], responses: list[str] | None = None) -> DataProto:
    """A DataProto as verl's trainer hands to the reward loop: left-padded prompts, right-padded responses."""
    responses = responses or [f"rewritten prompt {i}" for i in range(len(rows))]
    prompt_ids = [tokenizer.encode(f"rewrite: {i}") for i in range(len(rows))]
    response_ids = [tokenizer.encode(text) for text in responses]
    p_len, r_len = max(map(len, prompt_ids)), max(map(len, response_ids))
    prompts = torch.tensor([[0] * (p_len - len(p)) + p for p in prompt_ids])
    answers = torch.tensor([r + [0] * (r_len - len(r)) for r in response_ids])
    mask = torch.tensor([[0] * (p_len - len(p)) + [1] * (len(p) + len(r)) + [0] * (r_len - len(r))
                         for p, r in zip(prompt_ids, response_ids)])
    non_tensors = {"data_source": np.array(["finger_video"] * len(rows), dtype=object),
                   "reward_model": np.array([{"style": "rule", "ground_truth": ""}] * len(rows), dtype=object)}
    for key in {k for row in rows for k in row}:
        non_tensors[key] = np.array([row.get(key) for row in rows], dtype=object)
    return DataProto.from_dict(tensors={"prompts": prompts, "responses": answers, "attention_mask": mask,
                                        "input_ids": torch.cat([prompts, answers], dim=1)},
                               non_tensors=non_tensors)


def extra_rows(samples) -> list[dict]:
    return [{"extra_info": {"video": video, "prompt": prompt, "index": i}} for i, (video, prompt) in enumerate(samples)]


def assert_matches(output: dict, want):
    assert output["reward_score"] == pytest.approx(want.overall, abs=1e-6)
    info = output["reward_extra_info"]
    assert info["score"] == pytest.approx(want.overall, abs=1e-6) and info["failed"] == 0
    assert {d: info[d] for d in DIMENSIONS} == pytest.approx(want.dimensions, abs=1e-6)


def test_import_does_not_import_verl():
    code = ("import sys, finger_reward.integrations.verl as m; "
            "assert 'verl' not in sys.modules, 'verl imported'; m.compute_score; print('ok')")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "ok"


def test_compute_score_as_verls_loader_calls_it(service_env, tiny_model_dir, tokenizer, samples, direct):
    config = verl_config(tiny_model_dir, alternative_excerpt())
    loaded = get_custom_reward_fn(config)  # verl/trainer/ppo/reward.py: partial(_call_with_kwargs, fn, reward_kwargs)
    assert isinstance(loaded, partial) and loaded.func is _call_with_kwargs and loaded.args[0] is finger_verl.compute_score
    assert not inspect.iscoroutinefunction(finger_verl.compute_score)  # verl runs it in its thread pool
    # naive.py calls compute_score(data_source=, solution_str=, ground_truth=, extra_info=, **reward_kwargs)
    inspect.signature(finger_verl.compute_score).bind(data_source="d", solution_str="s", ground_truth="g", extra_info={},
                                                       **loaded.args[1])
    worker = RewardLoopWorker(config)  # the real worker (not as a Ray actor): tokenizer, load_reward_manager
    assert type(worker.reward_manager) is NaiveRewardManager
    outputs = worker.loop.run_until_complete(worker.compute_score_batch(make_batch(tokenizer, extra_rows(samples[:3]))))
    for output, pair in zip(outputs, samples[:3]):
        assert_matches(output, direct[pair])


def test_compute_score_failures(service_env, samples, direct):
    video, prompt = samples[0]
    call = partial(finger_verl.compute_score, data_source="d", solution_str="a new prompt", ground_truth="")
    assert call(extra_info={"video": video, "prompt": prompt})["score"] == pytest.approx(direct[samples[0]].overall, abs=1e-6)
    with pytest.raises(finger_verl.RewardSampleError, match=r"no video under 'video' \(extra_info keys: prompt\)"):
        call(extra_info={"prompt": prompt})
    with pytest.raises(finger_verl.RewardSampleError, match=r"/nowhere/gone\.mp4.*No such file"):
        call(extra_info={"video": "/nowhere/gone.mp4", "prompt": prompt})
    with pytest.raises(finger_verl.RewardSampleError, match="original prompt as a string"):
        call(extra_info={"video": video, "prompt": [{"role": "user", "content": prompt}]})
    failed = call(extra_info={"prompt": prompt}, failure_score=-1.0)
    assert failed["score"] == -1.0 and failed["failed"] == 1 and math.isnan(failed["visual_quality"])
    assert set(failed) == set(call(extra_info={"video": video, "prompt": prompt}))  # verl stacks keys across samples
    by_fn = call(solution_str=video, extra_info={"prompt": prompt}, video_fn=Path)  # response text -> video
    assert by_fn["score"] == pytest.approx(direct[samples[0]].overall, abs=1e-6)
    with pytest.raises(finger_verl.RewardSampleError, match="video_fn failed on the response"):
        call(extra_info={"prompt": prompt}, video_fn="json:loads")
    with pytest.raises(ValueError, match="unknown key.*vidoe_key.*valid keys"):
        call(extra_info={"video": video, "prompt": prompt}, vidoe_key="v")
    with pytest.raises(ValueError, match="max_batch would do nothing"):
        call(extra_info={"video": video, "prompt": prompt}, max_batch=8)
    with pytest.raises(ValueError, match="failure_score=nan"):
        call(extra_info={"video": video, "prompt": prompt}, failure_score=math.nan)


def test_compute_score_without_url(monkeypatch):
    monkeypatch.delenv("FINGER_REWARD_URL", raising=False)
    with pytest.raises(ValueError, match="FINGER_REWARD_URL"):
        finger_verl.compute_score("d", "s", "", {"video": "x.mp4", "prompt": "p"})


def test_manager_one_request_per_step(service_env, server, tiny_model_dir, tokenizer, samples, direct):
    config = verl_config(tiny_model_dir, manager_excerpt(), reward_kwargs={"max_batch": 8})
    worker = RewardLoopWorker(config)  # verl's loader: source=importlib, pkg://finger_reward.integrations.verl
    manager = worker.reward_manager
    assert isinstance(manager, RewardManagerBase) and type(manager) is finger_verl.FingerRewardManager
    assert (manager.options.max_batch, manager.options.reward_url) == (8, None) and manager.client.url == server.url
    data = make_batch(tokenizer, extra_rows(samples))

    async def step():  # verl: one task per sample, gathered (reward_loop.py compute_score_batch)
        return await asyncio.gather(*(manager.run_single(data[i : i + 1]) for i in range(len(data))))

    before = score_requests(server)
    outputs = manager.loop.run_until_complete(step())  # verl's managers run on the loop they were built on
    assert score_requests(server) - before == 1
    for output, pair in zip(outputs, samples):
        assert_matches(output, direct[pair])
    rm_scores = manager.assemble_rm_scores(data, [o["reward_score"] for o in outputs])
    assert rm_scores.sum(dim=1).tolist() == pytest.approx([direct[p].overall for p in samples], abs=1e-6)

    config = verl_config(tiny_model_dir, manager_excerpt(), reward_kwargs={"max_batch": 3, "max_wait_ms": 20})
    worker = RewardLoopWorker(config)
    before = score_requests(server)
    outputs = worker.loop.run_until_complete(worker.compute_score_batch(data))
    assert score_requests(server) - before == math.ceil(len(samples) / 3)
    for output, pair in zip(outputs, samples):
        assert_matches(output, direct[pair])


def test_manager_failed_sample_fails_alone(service_env, server, tiny_model_dir, tokenizer, samples, direct, caplog):
    rows = extra_rows(samples)
    del rows[2]["extra_info"]["video"]
    rows[5]["extra_info"]["video"] = "/nowhere/gone.mp4"
    data = make_batch(tokenizer, rows)
    manager = RewardLoopWorker(verl_config(tiny_model_dir, manager_excerpt())).reward_manager

    async def step():
        return await asyncio.gather(*(manager.run_single(data[i : i + 1]) for i in range(len(data))), return_exceptions=True)

    before = score_requests(server)
    with caplog.at_level(logging.ERROR, logger="finger_reward.integrations.verl"):
        outputs = manager.loop.run_until_complete(step())
    assert score_requests(server) - before == 1  # the 6 good videos went together; the missing file never left
    assert isinstance(outputs[2], finger_verl.RewardSampleError) and "no video under 'video'" in str(outputs[2])
    assert isinstance(outputs[5], finger_verl.RewardSampleError) and "/nowhere/gone.mp4" in str(outputs[5])
    assert "set failure_score" in str(outputs[5])
    for i, (output, pair) in enumerate(zip(outputs, samples)):
        if i not in (2, 5):
            assert_matches(output, direct[pair])
    assert sum("FingER could not score a sample" in r.getMessage() for r in caplog.records) == 2

    penalised = RewardLoopWorker(verl_config(tiny_model_dir, manager_excerpt(), reward_kwargs={"failure_score": 0.0}))
    outputs = penalised.loop.run_until_complete(penalised.compute_score_batch(data))
    assert [o["reward_score"] for o in (outputs[2], outputs[5])] == [0.0, 0.0]
    assert [o["reward_extra_info"]["failed"] for o in outputs] == [0, 0, 1, 0, 0, 1, 0, 0]
    infos = [o["reward_extra_info"] for o in outputs]
    stacked = {key: np.array([info[key] for info in infos]) for key in infos[0]}  # as reward_loop.py compute_rm_score
    assert stacked["score"].shape == (8,) and np.isnan(stacked["visual_quality"][2])


def test_manager_video_fn_non_tensor_fields_and_service_errors(service_env, server, tiny_model_dir, tokenizer,
                                                               samples, direct):
    # video_fn: the response text (here: a path) becomes the video; the prompt is a non-tensor field
    config = verl_config(tiny_model_dir, manager_excerpt(), reward_kwargs={"video_fn": "pathlib:Path"})
    data = make_batch(tokenizer, [{"prompt": p} for _, p in samples[:4]], responses=[v for v, _ in samples[:4]])
    worker = RewardLoopWorker(config)
    outputs = worker.loop.run_until_complete(worker.compute_score_batch(data))
    for output, pair in zip(outputs, samples[:4]):
        assert_matches(output, direct[pair])

    # the agent loop's tool_extra_fields may carry the video
    worker = RewardLoopWorker(verl_config(tiny_model_dir, manager_excerpt()))
    rows = [{"extra_info": {"prompt": p}, "tool_extra_fields": {"video": v}} for v, p in samples[:2]]
    outputs = worker.loop.run_until_complete(worker.compute_score_batch(make_batch(tokenizer, rows)))
    for output, pair in zip(outputs, samples[:2]):
        assert_matches(output, direct[pair])

    # a service that cannot be reached fails every sample of the request with the client's error
    plain = worker.reward_manager
    plain.client = FingerRewardClient("http://127.0.0.1:9", max_retries=0, on_error="nan")

    async def step():
        batch = make_batch(tokenizer, extra_rows(samples[:3]))
        return await asyncio.gather(*(plain.run_single(batch[i : i + 1]) for i in range(3)), return_exceptions=True)

    errors = plain.loop.run_until_complete(step())
    assert all(isinstance(e, ServiceError) and "cannot reach the service" in str(e) for e in errors)


def test_registry_config_checks_and_pickling(service_env, tiny_model_dir, tokenizer):
    cls = finger_verl.finger_reward_manager_class()
    assert get_reward_manager_cls("finger") is cls is finger_verl.FingerRewardManager
    by_name = verl_config(tiny_model_dir, manager_excerpt(), reward_manager={"source": "register", "name": "finger"})
    assert resolve_reward_manager_cls(by_name) is cls  # once the module is imported, verl finds it by name
    assert pickle.loads(pickle.dumps(cls)) is cls
    assert pickle.loads(pickle.dumps(finger_verl.compute_score)) is finger_verl.compute_score
    config = finger_verl.FingerVerlConfig(reward_url="http://x", max_batch=4, video_fn="pathlib:Path", failure_score=-1.0)
    assert pickle.loads(pickle.dumps(config)) == config
    loaded = get_custom_reward_fn(verl_config(tiny_model_dir, alternative_excerpt()))
    clone = pickle.loads(pickle.dumps(loaded))  # what Ray ships to remote reward workers
    assert clone.args[0] is finger_verl.compute_score and clone.args[1] == loaded.args[1]
    manager = cls(OmegaConf.create({"reward": {"reward_kwargs": {"max_batch": 2}}}), tokenizer, None, max_wait_ms=0)
    assert pickle.loads(pickle.dumps(manager.options)) == manager.options and manager.options.max_wait_ms == 0
    assert pickle.loads(pickle.dumps(manager.client)).url == manager.client.url

    with pytest.raises(ValueError, match=r"reward\.reward_kwargs: unknown key.*max_batches.*valid keys"):
        cls(OmegaConf.create({"reward": {"reward_kwargs": {"max_batches": 2}}}), tokenizer, None)
    with pytest.raises(ValueError, match="max_batch=0 must be at least 1"):
        cls(OmegaConf.create({"reward": {"reward_kwargs": {"max_batch": 0}}}), tokenizer, None)
    with pytest.raises(ValueError, match="video_fn='nothing'"):
        cls(OmegaConf.create({"reward": {"reward_kwargs": {"video_fn": "nothing"}}}), tokenizer, None)
