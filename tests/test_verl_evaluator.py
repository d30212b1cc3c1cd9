"""Evaluator GRPO on verl 0.9.1: the reward as verl's loader and reward loop call it, FingER-Instruct -> verl parquet
read back by verl's own datasets and rollout tokenizer (compared with the engine's inputs), and the launcher's
command checked against verl's Hydra config; the dry run (everything before verl's first GPU call, verl's agent loop
with a scripted rollout and its reward loop) and the error of each of its checks. verl's rollouts need GPUs (vLLM)
and are not run here; README ("On many GPUs (verl)") says why one GRPO step cannot run on CPU."""

import asyncio
import json
import pickle
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("verl", reason="needs the verl extra: pip install 'finger-reward[verl]'")

import pandas as pd  # noqa: E402  (verl dependencies)
from omegaconf import OmegaConf  # noqa: E402

import finger_reward.integrations.verl_evaluator as evaluator  # noqa: E402
from finger_reward import prompts  # noqa: E402
from finger_reward.engine.inputs import processor_inputs  # noqa: E402
from finger_reward.instruct import InstructError, InstructRecord, VideoSFTCollator  # noqa: E402
from finger_reward.rewards import accuracy_reward, format_reward  # noqa: E402
from finger_reward.synthetic import make_world  # noqa: E402
from finger_reward.tiny import build_processor  # noqa: E402
from finger_reward.trainers import verl_dry_run, verl_grpo  # noqa: E402

from verl import DataProto  # noqa: E402
from verl.experimental.reward_loop.reward_loop import RewardLoopWorker, migrate_legacy_reward_impl  # noqa: E402
from verl.experimental.reward_loop.reward_manager import NaiveRewardManager  # noqa: E402
from verl.utils.dataset.rl_dataset import RLHFDataset, get_dataset_class  # noqa: E402
from verl.utils.tokenizer import build_multimodal_processor_inputs  # noqa: E402
from verl.utils.tokenizer.continuous_token_wiring import create_continuous_token_builder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
YAML = ROOT / "configs" / "verl_grpo.yaml"

# (completion, ground truth, r_accuracy, r_format) from FingER Eq. 10-11, written by hand
COMPLETIONS = [
    ("<reason>The square keeps its colour in every frame.</reason><answer>Yes</answer>", "Yes", 1.0, 1.0),
    ("<reason>The square keeps its colour in every frame.</reason><answer>Yes</answer>", "No", 0.0, 1.0),
    ("  <reason>It flickers between frames.</reason>\n<answer>no</answer>\n", "No", 1.0, 1.0),
    ("Yes", "Yes", 0.0, 0.0),                                                     # no tags
    ("<reason>The square is blue.</reason>", "Yes", 0.0, 0.0),                     # no answer tag
    ("<reason>Yes, the square is blue.</reason>", "Yes", 0.0, 0.0),                # Yes inside the reason only
    ("<reason>Yes, the square is blue.</reason><answer>Yes</answer>", "Yes", 1.0, 0.0),  # Yes also in the reason
    ("<reason>Blue.</reason><answer>Yes</answer><answer>No</answer>", "Yes", 0.0, 0.0),  # two answers
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("verl_eval"), num_scenes=1)


@pytest.fixture(scope="module")
def parquet(world, tmp_path_factory):
    return evaluator.instruct_to_verl(world.instruct_path, tmp_path_factory.mktemp("parquet") / "train.parquet")


@pytest.fixture(scope="module")
def small_parquet(world, tmp_path_factory):
    """One question per clip (6 rows), so verl's datasets decode few videos."""
    lines = world.instruct_path.read_text().splitlines()
    per_clip = {}
    for line in lines:
        per_clip.setdefault(json.loads(line)["video"], line)
    path = tmp_path_factory.mktemp("small") / "instruct.jsonl"
    path.write_text("\n".join(per_clip.values()) + "\n")
    return evaluator.instruct_to_verl(path, path.with_suffix(".parquet"))


@pytest.fixture(scope="module")
def processor():
    return build_processor()


def engine_inputs(processor, row: dict):
    """What the engine (and trainers/grpo.py) gives the model for this parquet row's question and video."""
    info = row["extra_info"]
    record = InstructRecord.from_dict({**{k: info[k] for k in ("prompt", "dimension", "entity", "question", "positive")},
                                       "video": info["video"], "answer": row["reward_model"]["ground_truth"]})
    collator = VideoSFTCollator(processor, "reason")
    return processor_inputs(processor, collator.prompt_text(record), collator.load_clip(record))


def verl_data_config(tmp_path, **options) -> OmegaConf:
    """The data section verl hands its dataset and agent loop, from the YAML's data settings."""
    data = yaml.safe_load(YAML.read_text())["data"]
    return OmegaConf.create({"max_prompt_length": data["max_prompt_length"], "filter_overlong_prompts": True,
                             "filter_overlong_prompts_workers": None, "cache_dir": str(tmp_path / "cache"),
                             "mm_processor_kwargs": data["mm_processor_kwargs"], "custom_cls": data["custom_cls"],
                             **options})


# ---- the reward -------------------------------------------------------------------------------------


@pytest.mark.parametrize("completion, truth, acc, fmt", COMPLETIONS)
def test_compute_score_is_rewards_py(completion, truth, acc, fmt):
    result = evaluator.compute_score("finger_instruct", completion, truth, {"index": 0})
    assert (result["acc"], result["format"]) == (acc, fmt)
    assert result["acc"] == accuracy_reward([completion], answer=[truth])[0]
    assert result["format"] == format_reward([completion])[0]
    assert result["score"] == acc + fmt  # FingER Eq. 9
    weighted = evaluator.compute_score("d", completion, truth, accuracy_weight=2.0, format_weight=0.5)
    assert weighted["score"] == 2.0 * acc + 0.5 * fmt


def test_compute_score_errors():
    with pytest.raises(ValueError, match=r"ground_truth must be 'Yes' or 'No' \(extra_info index 7\), got 'Maybe'"):
        evaluator.compute_score("d", "<reason>r</reason><answer>Yes</answer>", "Maybe", {"index": 7})
    with pytest.raises(TypeError, match=r"unknown reward_kwargs \['acc_weight'\]"):
        evaluator.compute_score("d", "x", "Yes", acc_weight=1.0)
    # verl's reward-model plumbing is accepted and ignored, as in integrations/verl.py
    assert evaluator.compute_score("d", "x", "Yes", reward_router_address=None, reward_model_tokenizer=None)["score"] == 0.0


def test_reward_loop_scores_as_verl_does(tiny_model_dir, tmp_path):
    """verl's RewardLoopWorker with the YAML's reward settings: loader, naive manager, decoded responses."""
    settings = yaml.safe_load(YAML.read_text())
    settings.pop("finger")  # the launcher's own block
    overrides = verl_grpo.to_overrides(settings, verl_grpo.compose_verl(), "test")
    config = migrate_legacy_reward_impl(verl_grpo.compose_verl(overrides + [f"actor_rollout_ref.model.path={tiny_model_dir}"]))
    worker = RewardLoopWorker(config)
    assert type(worker.reward_manager) is NaiveRewardManager
    tokenizer = worker.reward_manager.tokenizer
    # as verl's rollout hands them over: left-padded prompts, right-padded responses ending in <|im_end|>
    prompt = tokenizer.encode("question", add_special_tokens=False)
    responses = [tokenizer.encode(c + "<|im_end|>", add_special_tokens=False) for c, *_ in COMPLETIONS]
    width = max(map(len, responses))
    data = DataProto.from_dict(
        tensors={"prompts": torch.tensor([prompt] * len(responses)),
                 "responses": torch.tensor([r + [0] * (width - len(r)) for r in responses]),
                 "attention_mask": torch.tensor([[1] * (len(prompt) + len(r)) + [0] * (width - len(r)) for r in responses])},
        non_tensors={"data_source": np.array([evaluator.DATA_SOURCE] * len(responses), dtype=object),
                     "reward_model": np.array([{"style": "rule", "ground_truth": t} for _, t, *_ in COMPLETIONS], dtype=object),
                     "extra_info": np.array([{"index": i} for i in range(len(responses))], dtype=object)})
    data.batch["input_ids"] = torch.cat([data.batch["prompts"], data.batch["responses"]], dim=1)
    outputs = worker.loop.run_until_complete(worker.compute_score_batch(data))
    for output, (_, _, acc, fmt) in zip(outputs, COMPLETIONS):
        assert output["reward_score"] == acc + fmt
        assert (output["reward_extra_info"]["acc"], output["reward_extra_info"]["format"]) == (acc, fmt)


# ---- FingER-Instruct -> verl parquet ---------------------------------------------------------------------


def test_parquet_round_trip(world, parquet, processor, tmp_path):
    lines = [json.loads(line) for line in world.instruct_path.read_text().splitlines()]
    frame = pd.read_parquet(parquet)
    assert list(frame.columns) == ["data_source", "prompt", "videos", "reward_model", "extra_info"]
    assert len(frame) == len(lines)
    for i, (line, row) in enumerate(zip(lines, frame.to_dict("records"))):
        assert row["data_source"] == evaluator.DATA_SOURCE
        assert row["reward_model"] == {"style": "rule", "ground_truth": line["answer"]}
        info = row["extra_info"]
        assert (info["index"], info["split"], info["source"]) == (i, "train", f"{world.instruct_path}, line {i + 1}")
        assert {k: info[k] for k in ("prompt", "dimension", "entity", "question", "positive")} == \
            {k: line[k] for k in ("prompt", "dimension", "entity", "question", "positive")}
        (video,) = row["videos"]
        assert video == {"video": str(Path(line["video"]).resolve()), "fps": 2.0, "max_frames": 48,
                         "max_pixels": 448 * 448, "min_pixels": 28 * 28}
        assert Path(video["video"]).is_absolute() and Path(video["video"]).is_file()
        assert [dict(m) for m in row["prompt"]] == [
            {"role": "system", "content": prompts.SYSTEM_PROMPTS["reason"]},
            {"role": "user", "content": "<video>" + line["question"]}]
    # verl's RLHFDataset splits "<video>question" into a video block and a text block: rendered by the chat
    # template, every row is exactly the engine's prompt for its question
    config = verl_data_config(tmp_path, filter_overlong_prompts=False)
    dataset = RLHFDataset(str(parquet), processor.tokenizer, config, processor)
    split = prompts.split_prompt(processor, "reason")
    assert len(dataset) == len(lines)
    for i, line in enumerate(lines):
        row = dataset[i]
        assert row["reward_model"]["ground_truth"] == line["answer"] and row["index"] == i
        rendered = processor.apply_chat_template(row["raw_prompt"], add_generation_prompt=True, tokenize=False)
        assert rendered == split.prefix + split.text_after_video(line["question"])


def test_bad_lines_are_named(world, tmp_path):
    lines = world.instruct_path.read_text().splitlines()[:3]
    bad = json.loads(lines[1]) | {"answer": "Maybe"}
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([lines[0], json.dumps(bad), lines[2]]) + "\n")
    with pytest.raises(InstructError, match=rf"{path}, line 2: field 'answer' must be 'Yes' or 'No', got 'Maybe'"):
        evaluator.instruct_to_verl(path, tmp_path / "out.parquet")
    bad = json.loads(lines[2]) | {"question": "Does the <video> show a square?"}
    path.write_text("\n".join([lines[0], lines[1], json.dumps(bad)]) + "\n")
    with pytest.raises(InstructError, match=rf"{path}, line 3: field 'question' contains <video>"):
        evaluator.instruct_to_verl(path, tmp_path / "out.parquet")
    missing = json.loads(lines[0]) | {"video": "videos/none.mp4"}
    path.write_text(json.dumps(missing) + "\n")
    with pytest.raises(InstructError, match=rf"line 1: video {world.instruct_path.parent}/videos/none.mp4 not found"):
        evaluator.instruct_to_verl(path, tmp_path / "out.parquet", video_root=world.instruct_path.parent)
    with pytest.raises(ValueError, match="only mode='reason'"):
        evaluator.instruct_to_verl(world.instruct_path, tmp_path / "out.parquet", mode="answer")
    assert not (tmp_path / "out.parquet").exists()


# ---- verl's datasets and rollout tokenizer on the parquet ---------------------------------------------


def rollout_prompt(dataset_cls, dataset, processor, config) -> tuple[list[int], dict]:
    """Row 0 as verl's single-turn agent loop builds the rollout prompt: the dataset class's media, then the
    Qwen-VL continuous-token builder (the token ids vLLM receives) with data.mm_processor_kwargs."""
    messages = dataset[0]["raw_prompt"]
    _, videos, _ = asyncio.run(dataset_cls.process_multi_modal_info(messages, image_patch_size=14, config=config))
    builder = create_continuous_token_builder(processor.tokenizer, hf_model_type="qwen2_5_vl", processor=processor,
                                              mm_processor_kwargs=dict(config.mm_processor_kwargs))
    features: dict = {}
    ids = builder.build_initial_tokens(messages, videos=videos, mm_inputs_out=features)
    return ids, features


def test_finger_video_dataset_gives_the_engines_inputs(small_parquet, processor, tmp_path):
    config = verl_data_config(tmp_path)
    cls = get_dataset_class(config)  # verl's loader: data.custom_cls from the YAML
    assert cls is evaluator.FingerVideoDataset and issubclass(cls, RLHFDataset)
    assert pickle.loads(pickle.dumps(cls)) is cls
    dataset = cls(str(small_parquet), processor.tokenizer, config, processor)
    assert len(dataset) == 6  # none filtered as too long
    ids, features = rollout_prompt(cls, dataset, processor, config)
    want = engine_inputs(processor, pd.read_parquet(small_parquet).to_dict("records")[0])
    assert ids == want["input_ids"][0].tolist()
    video_token = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert ids.count(video_token) == int(want["video_grid_thw"].prod()) // 4 > 0
    for key in ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts"):
        assert torch.equal(features[key], want[key]), key


def test_verl_rlhf_dataset_loads_the_parquet(small_parquet, processor, tmp_path):
    """verl's own RLHFDataset (qwen-vl-utils decoding) reads the rows: same prompt tokens and video grid as the
    engine (min_pixels and do_resize=false keep the engine's frame size), frames chosen by qwen-vl-utils."""
    config = verl_data_config(tmp_path, custom_cls={"path": None, "name": None})
    assert get_dataset_class(config) is RLHFDataset
    dataset = RLHFDataset(str(small_parquet), processor.tokenizer, config, processor)
    assert len(dataset) == 6
    ids, features = rollout_prompt(RLHFDataset, dataset, processor, config)
    want = engine_inputs(processor, pd.read_parquet(small_parquet).to_dict("records")[0])
    assert ids == want["input_ids"][0].tolist()
    assert torch.equal(features["video_grid_thw"], want["video_grid_thw"])
    # the same through the processor call verl's actor makes (build_multimodal_processor_inputs)
    messages = dataset[0]["raw_prompt"]
    _, videos, _ = RLHFDataset._process_multi_modal_info(messages, 14, config)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = build_multimodal_processor_inputs(processor, text=[text], videos=videos,
                                               mm_processor_kwargs=dict(config.mm_processor_kwargs))
    assert inputs["input_ids"][0].tolist() == ids


def test_finger_video_dataset_rejects_other_media(world):
    cls = evaluator.FingerVideoDataset
    video = str(world.clips[0].path)
    with pytest.raises(ValueError, match="reads videos only"):
        cls._process_multi_modal_info([{"role": "user", "content": [{"type": "image", "image": "x.png"}]}], 14, None)
    with pytest.raises(ValueError, match="reads fps, max_frames and max_pixels, not nframes"):
        cls._process_multi_modal_info([{"role": "user", "content": [{"type": "video", "video": video, "nframes": 4}]}],
                                      14, None)


def test_import_does_not_import_verl():
    code = ("import sys, finger_reward.integrations.verl_evaluator as m; "
            "assert 'verl' not in sys.modules, 'verl imported'; m.compute_score; print('ok')")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "ok"


# ---- the config and the launcher -------------------------------------------------------------------------


def test_yaml_has_the_papers_settings_and_agrees_with_trainers_grpo():
    config = yaml.safe_load(YAML.read_text())
    zero = yaml.safe_load((ROOT / "configs" / "grpo_zero.yaml").read_text())
    actor, rollout = config["actor_rollout_ref"]["actor"], config["actor_rollout_ref"]["rollout"]
    assert config["algorithm"]["adv_estimator"] == "grpo" and config["algorithm"]["norm_adv_by_std_in_grpo"] is True
    assert rollout["n"] == zero["num_generations"] == 16
    assert actor["use_kl_loss"] is True and actor["kl_loss_coef"] == zero["beta"] == 0.04
    assert actor["clip_ratio"] == actor["clip_ratio_low"] == actor["clip_ratio_high"] == zero["epsilon"] == 0.2
    assert actor["ppo_epochs"] == zero["num_iterations"] == 1
    assert actor["optim"]["lr"] == zero["learning_rate"] == 5e-7
    assert config["data"]["max_response_length"] == zero["max_completion_length"] == 256
    assert config["trainer"]["total_training_steps"] == zero["max_steps"] == 2000
    finger = verl_grpo.Conversion.from_mapping(config["finger"], "yaml")
    assert (finger.fps, finger.max_pixels, finger.max_frames) == (zero["fps"], zero["max_pixels"], zero["max_frames"])
    assert config["reward"]["custom_reward_function"] == {
        "path": "pkg://finger_reward.integrations.verl_evaluator", "name": "compute_score"}


@pytest.fixture(scope="module")
def dry_run_output(world, tiny_model_dir, tmp_path_factory):
    """`python -m finger_reward.trainers.verl_grpo ... --dry-run` once: (exit code, stdout, stderr, output dir).
    The model directory's name has a space (the command must quote it); two overrides change the YAML."""
    import contextlib
    import io

    root = tmp_path_factory.mktemp("dry")
    (root / "my sft").symlink_to(tiny_model_dir, target_is_directory=True)
    out, stdout, stderr = root / "run", io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = verl_grpo.main(["--config", str(YAML), "--model", str(root / "my sft"), "--train", str(world.instruct_path),
                               "--val", str(world.instruct_path), "--output_dir", str(out), "--dry-run",
                               "trainer.n_gpus_per_node=8", "actor_rollout_ref.rollout.n=8"])
    return code, stdout.getvalue(), stderr.getvalue(), out


def test_dry_run_prints_a_command_verl_accepts(world, dry_run_output, tmp_path):
    code, stdout, _, out = dry_run_output
    assert code == 0
    command = shlex.split(stdout)
    assert command[:3] == [sys.executable, "-m", "verl.trainer.main_ppo"]
    overrides = command[3:]
    model = str(out.parent / "my sft")
    for expected in ("algorithm.adv_estimator=grpo", "actor_rollout_ref.actor.use_kl_loss=true",
                     "actor_rollout_ref.actor.kl_loss_coef=0.04", "actor_rollout_ref.actor.clip_ratio=0.2",
                     "actor_rollout_ref.actor.ppo_epochs=1", "actor_rollout_ref.actor.optim.lr=5e-07",
                     "data.max_response_length=256",
                     "reward.custom_reward_function.path=pkg://finger_reward.integrations.verl_evaluator",
                     "reward.custom_reward_function.name=compute_score", f"actor_rollout_ref.model.path='{model}'",  # quoted for Hydra
                     f"data.train_files={out}/data/train.parquet", f"data.val_files={out}/data/val.parquet",
                     "trainer.n_gpus_per_node=8", "actor_rollout_ref.rollout.n=8"):
        assert expected in overrides, expected
    assert "actor_rollout_ref.rollout.n=16" not in overrides  # the command line wins, once
    assert not any(o.startswith("finger.") for o in overrides)
    config = verl_grpo.compose_verl(overrides)  # what main_ppo's Hydra composes from this command
    assert config.actor_rollout_ref.actor.kl_loss_coef == 0.04 and config.actor_rollout_ref.rollout.n == 8
    assert config.actor_rollout_ref.model.path == model
    assert config.data.mm_processor_kwargs == {"do_resize": False}
    assert config.trainer.default_local_dir == str(out)
    assert len(pd.read_parquet(config.data.train_files)) == len(world.instruct_path.read_text().splitlines())


def test_dry_run_summary_reports_the_resolved_settings(dry_run_output):
    _, _, stderr, out = dry_run_output
    summary = stderr[stderr.index("verl dry run: every check passed"):]
    lines = {line.split(None, 1)[0]: line for line in summary.splitlines()[1:] if line.startswith("  ") and line[2] != " "}
    assert "G=8, beta=0.04 (low_var_kl in the loss), clip 0.2/0.2, mu=1, lr 5e-07" in lines["config"]  # n from the command line
    assert "1 x 8 GPUs, 2000 steps, rollout vllm" in lines["config"]
    assert "(qwen2_5_vl, Qwen2_5_VLProcessor)" in lines["model"]
    assert "pkg://finger_reward.integrations.verl_evaluator:compute_score via NaiveRewardManager" in lines["reward"]
    assert "finger_video: finger_reward.integrations.verl_evaluator.FingerAgentLoop" in lines["agent"]
    assert "train: 60 rows, videos at fps 2.0, <= 48 frames, <= 200704 pixels" in lines["data"]
    assert "train row 0 (FingerVideoDataset)" in lines["rollout"] and "video grid [" in lines["rollout"]
    assert "positions are finger_reward.rope's" in lines["rope"]
    assert ("correct 2 (acc 1, format 1), wrong 1 (acc 0, format 1), malformed 0 (acc 0, format 0)"
            in lines["rewards"])


@pytest.fixture(scope="module")
def overrides(small_parquet, tiny_model_dir, tmp_path_factory):
    """main_ppo's overrides for the YAML with the tiny model and the 6-row parquet (the launcher's own command)."""
    jsonl = small_parquet.with_suffix(".jsonl")
    return verl_grpo.build_command(YAML, model=tiny_model_dir, train=jsonl, val=jsonl,
                                   output_dir=tmp_path_factory.mktemp("dry_small"))[3:]


def test_dry_run_builds_the_engines_prompt_and_checks_the_rewards(overrides, processor, small_parquet):
    """The agent loop's prompt for row 0 (verl's dataset, agent loop and token builder, in the dry run) is the
    engine's prompt; the rewards verl's reward loop gave the three sample completions are FingER's."""
    report = verl_dry_run.dry_run(overrides, rows=1)
    want = engine_inputs(processor, pd.read_parquet(small_parquet).to_dict("records")[0])
    assert report.prompts == [want["input_ids"][0].tolist()]
    truth = pd.read_parquet(small_parquet)["reward_model"][0]["ground_truth"]
    for kind, (completion, acc, fmt) in verl_dry_run.sample_completions(truth).items():
        assert report.rewards[kind] == {"score": acc + fmt, "acc": acc, "format": fmt}
        assert evaluator.compute_score("d", completion, truth) == report.rewards[kind]
    assert [report.rewards[k]["score"] for k in ("correct", "wrong", "malformed")] == [2.0, 1.0, 0.0]


def test_dry_run_catches_a_reward_that_is_not_fingers(overrides, tmp_path):
    module = tmp_path / "always_right.py"
    module.write_text("def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kw):\n"
                      "    return {'score': 2.0, 'acc': 1.0, 'format': 1.0}\n")
    with pytest.raises(verl_dry_run.DryRunError, match=r"rewards: train row 0: the wrong completion got "
                                                       r"\{'score': 2.0, 'acc': 1.0, 'format': 1.0\}, FingER"):
        verl_dry_run.dry_run(overrides + [f"reward.custom_reward_function.path={module}"], rows=1)


@pytest.mark.parametrize("extra, message", [
    (["reward.custom_reward_function.path=pkg://finger_reward.integrations.no_such_module"],
     r"reward: .*no_such_module.* \(reward.custom_reward_function path=pkg://finger_reward.integrations.no_such_module"),
    (["reward.custom_reward_function.name=compute_scor"], r"reward: .*compute_scor"),
    (["actor_rollout_ref.rollout.agent.default_agent_loop=finger_vide"],
     r"agent loop: default_agent_loop 'finger_vide' is not defined; defined: .*finger_video"),
    (["actor_rollout_ref.actor.kl_los_coef=0.1"], r"config: Could not override 'actor_rollout_ref.actor.kl_los_coef'"),
    (["actor_rollout_ref.model.path=/no/such/model"], r"model: .*/no/such/model.*pass --model a local checkpoint"),
])
def test_dry_run_errors_name_the_check(overrides, extra, message):
    with pytest.raises(verl_dry_run.DryRunError, match=message):
        verl_dry_run.dry_run(overrides + extra)


def test_dry_run_names_a_broken_parquet_row(overrides, small_parquet, tmp_path):
    rows = pd.read_parquet(small_parquet).to_dict("records")
    broken = tmp_path / "broken.parquet"
    cases = [({"reward_model": {"style": "rule", "ground_truth": "Maybe"}},
              r"row 2: reward_model.ground_truth must be 'Yes' or 'No', got 'Maybe'"),
             ({"videos": [{**rows[2]["videos"][0], "video": str(tmp_path / "gone.mp4")}]},
              rf"row 2: video file '{tmp_path}/gone.mp4' not found"),
             ({"prompt": [{"role": "user", "content": "no video here"}]},
              r"row 2: needs exactly one video and one <video> in the prompt; has 1 video\(s\) and 0 <video>")]
    for change, message in cases:
        pd.DataFrame(rows[:2] + [{**rows[2], **change}] + rows[3:]).to_parquet(broken, index=False)
        with pytest.raises(verl_dry_run.DryRunError, match=rf"data: {broken} {message}"):
            verl_dry_run.dry_run(overrides + [f"data.val_files={broken}"])
    with pytest.raises(verl_dry_run.DryRunError, match=rf"data: parquet file {tmp_path}/none.parquet not found"):
        verl_dry_run.dry_run(overrides + [f"data.train_files={tmp_path}/none.parquet"])


def test_dry_run_exit_code_and_message(world, tiny_model_dir, tmp_path, capsys):
    code = verl_grpo.main(["--config", str(YAML), "--model", str(tiny_model_dir), "--train", str(world.instruct_path),
                           "--val", str(world.instruct_path), "--output_dir", str(tmp_path), "--dry-run",
                           "reward.custom_reward_function.name=nope"])
    assert code == 1
    captured = capsys.readouterr()
    assert captured.out == ""  # no command for a failed dry run
    assert "verl_grpo: dry run failed: reward: " in captured.err and "name=nope" in captured.err


def test_launcher_errors(world, tmp_path):
    bad = yaml.safe_load(YAML.read_text())
    bad["actor_rollout_ref"]["actor"]["kl_los_coef"] = 0.04
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(bad))
    args = dict(model=None, train=world.instruct_path, val=world.instruct_path, output_dir=tmp_path / "run")
    with pytest.raises(ValueError, match=r"typo.yaml: actor_rollout_ref.actor.kl_los_coef is not a key of verl"):
        verl_grpo.build_command(path, **args)
    bad = yaml.safe_load(YAML.read_text())
    bad["finger"]["frames"] = 8
    path.write_text(yaml.safe_dump(bad))
    with pytest.raises(ValueError, match="unknown key.*frames under 'finger'"):
        verl_grpo.build_command(path, **args)
    with pytest.raises(verl_dry_run.DryRunError,  # verl's validate_config
                       match=r"config: real_train_batch_size \(128\) must be divisible.*\(verl's validate_config\)"):
        verl_grpo.build_command(YAML, **args, overrides=["trainer.n_gpus_per_node=3"])


def test_hydra_values():
    assert [verl_grpo.hydra_value(v) for v in (None, True, 3, 5e-7, "pkg://a.b", "a b", "1", "it's", ["x", 1], {})] == \
        ["null", "true", "3", "5e-07", "pkg://a.b", "'a b'", "'1'", "'it\\'s'", "[x,1]", "{}"]


# ---- rope positions in verl's actor ------------------------------------------------------------------------


def test_verl_computes_the_actors_positions_with_finger_reward_rope(world, tiny_model_dir):
    """verl's own AgentLoopWorker._compute_position_ids, on a processor bound by bind_rope_positions, gives
    finger_reward.rope's positions (second_per_grid_ts included) in its (1, 4, L) layout."""
    from types import SimpleNamespace

    from transformers import AutoConfig, AutoProcessor
    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker

    from finger_reward.rope import with_rope_positions
    from finger_reward.video import load_video

    config, processor = AutoConfig.from_pretrained(tiny_model_dir), AutoProcessor.from_pretrained(tiny_model_dir)
    # 3 fps: second_per_grid_ts is 2/3, which transformers 5.x would truncate to 0 before scaling.
    clip = load_video(str(world.clips[0].path), fps=3.0, max_frames=6)
    split = prompts.split_prompt(processor, "reason")
    inputs = processor_inputs(processor, split.prefix + split.text_after_video("Is it red?"), clip)
    evaluator.bind_rope_positions(processor, config)
    worker = SimpleNamespace(processor=processor)
    mm = {k: inputs[k] for k in ("video_grid_thw", "second_per_grid_ts", "pixel_values_videos", "mm_token_type_ids")}
    got = AgentLoopWorker._compute_position_ids(worker, inputs["input_ids"], inputs["attention_mask"], mm)
    want = with_rope_positions(config, inputs)["position_ids"]
    assert got.shape == (1, 4, inputs["input_ids"].shape[1])
    assert torch.equal(got[0, 1:], want[:, 0])
    assert torch.equal(got[0, 0], torch.arange(inputs["input_ids"].shape[1]))  # verl's 1-D text row


def test_the_yaml_selects_the_agent_loop_and_the_launcher_points_verl_at_it(dry_run_output, tiny_model_dir):
    import hydra
    from transformers import AutoConfig, AutoProcessor
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap
    from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop

    from finger_reward.rope import RopeLayout, rope_positions

    config = verl_grpo.compose_verl(shlex.split(dry_run_output[1])[3:])
    agent = config.actor_rollout_ref.rollout.agent
    assert agent.default_agent_loop == "finger_video"
    (entry,) = [e for e in OmegaConf.load(agent.agent_loop_config_path) if e.name == agent.default_agent_loop]
    cls = hydra.utils.get_class(entry._target_)  # what verl's worker instantiates
    assert cls is evaluator.FingerAgentLoop and issubclass(cls, SingleTurnAgentLoop)
    assert pickle.loads(pickle.dumps(cls)) is cls
    # Instantiated as verl's worker does, it binds the worker's processor (verl sets processor.config).
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    processor.config = AutoConfig.from_pretrained(tiny_model_dir)
    hydra.utils.instantiate(entry, trainer_config=DictConfigWrap(config=config), server_manager=None,
                            tokenizer=processor.tokenizer, processor=processor, hf_model_type="qwen2_5_vl",
                            dataset_cls=evaluator.FingerVideoDataset, data_config=DictConfigWrap(config.data))
    ids = torch.tensor([[9] * 3 + [processor.video_token_id] * 24 + [9] * 2])
    grid, spg = torch.tensor([[4, 4, 6]]), torch.tensor([0.5])
    got, _ = processor.get_rope_index(input_ids=ids, attention_mask=torch.ones_like(ids), video_grid_thw=grid,
                                      **processor.get_rope_index_kwargs({"second_per_grid_ts": spg}))
    want, _ = rope_positions(RopeLayout.from_config(processor.config), ids, video_grid_thw=grid, second_per_grid_ts=spg)
    assert torch.equal(got, want)
