"""The dry run of `trainers/verl_grpo.py`: everything verl 0.9.1 does before its first GPU call, on CPU, with verl's own code.

verl 0.9.1 cannot run a GRPO step on CPU (README, "On many GPUs (verl)", says why: no HF rollout,
NCCL process groups, Ray GPU bundles), so the dry run stops where the GPUs start and checks what
comes before them, in the order a run meets it:

1. config: the Hydra overrides composed as `main_ppo` composes them, `validate_config`, resolved,
   and converted to verl's config dataclasses (actor, rollout, model, algorithm), as its workers do;
2. model: verl's `HFModelConfig` loads the checkpoint's config, tokenizer and processor (not the weights);
3. reward: `reward.custom_reward_function` loaded by verl's loader, the reward manager resolved;
4. agent loop: `rollout.agent.default_agent_loop` found in `agent_loop_config_path` and importable;
5. data: every row of the train and val parquet (schema, ground truth, one video per `<video>`, files exist);
6. rollout inputs and rewards: verl's `AgentLoopWorker`, in this process, runs the configured agent loop on the
   first rows through verl's dataset class, with a scripted rollout (a correct, a wrong and a malformed
   completion in place of vLLM's sampling) and verl's `RewardLoopWorker` as its reward worker: prompt
   tokens, video tensors and rope positions as the actor will see them, and the rewards checked against
   FingER Eq. 9-11.

`dry_run(overrides)` returns a `DryRunReport`; a failed check raises `DryRunError` naming the check.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from finger_reward.integrations.verl_evaluator import PLACEHOLDERS
from finger_reward.rope import RopeLayout, rope_positions

ANSWERS = ("yes", "no")
ROLLOUT_PACKAGES = {"vllm": "vllm", "sglang": "sglang", "trtllm": "tensorrt_llm"}  # rollout.name -> module


class DryRunError(ValueError):
    """A dry-run check failed: `check` names it (config, model, reward, agent loop, data, rollout, rewards)."""

    def __init__(self, check: str, message: str):
        super().__init__(f"{check}: {message}")
        self.check = check


@dataclass
class DryRunReport:
    """What the dry run found, as lines `check: finding`; `warnings` are not failures."""

    lines: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    rewards: dict[str, dict] = field(default_factory=dict)  # completion kind -> {"score", "acc", "format"}
    prompts: list[list[int]] = field(default_factory=list)  # each checked row's prompt token ids, as the actor sees them

    def add(self, check: str, finding: str) -> None:
        self.lines.append((check, finding))

    def summary(self) -> str:
        width = max(len(c) for c, _ in self.lines)
        head = "verl dry run: every check passed; what is left needs GPUs (the rollout server, the FSDP actor on NCCL)"
        body = [f"  {c:<{width}}  {f}" for c, f in self.lines] + [f"  warning: {w}" for w in self.warnings]
        return "\n".join([head, *body])


# ---- sample completions and their FingER rewards (Eq. 10-11) ----------------------------------------


def sample_completions(ground_truth: str) -> dict[str, tuple[str, float, float]]:
    """kind -> (completion, r_accuracy, r_format): a correct well-formed, a wrong well-formed, a malformed one."""
    truth = ground_truth.strip().capitalize()
    other = "No" if truth == "Yes" else "Yes"
    return {"correct": (f"<reason>The clip shows it in every frame.</reason><answer>{truth}</answer>", 1.0, 1.0),
            "wrong": (f"<reason>The clip shows it in every frame.</reason><answer>{other}</answer>", 0.0, 1.0),
            "malformed": (f"{truth}, the clip shows it.", 0.0, 0.0)}


# ---- 1-4: config, model, reward, agent loop -----------------------------------------------------------


@contextlib.contextmanager
def failing_as(check: str, hint: str = ""):
    """Re-raise any error inside as DryRunError(check), keeping the original message."""
    try:
        yield
    except DryRunError:
        raise
    except Exception as err:  # noqa: BLE001 - every failure here becomes one clear line
        message = " ".join(str(err).split()) or type(err).__name__
        raise DryRunError(check, f"{message}{hint}") from err


def resolve_config(overrides: list[str]):
    """verl's config for `overrides`, checked as `main_ppo` and its workers check it (raises DryRunError)."""
    from omegaconf import OmegaConf
    from verl.experimental.reward_loop.reward_loop import migrate_legacy_reward_impl
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    from finger_reward.trainers.verl_grpo import compose_verl

    with failing_as("config"):
        config = compose_verl(overrides)
    with failing_as("config", " (verl's validate_config)"), contextlib.redirect_stdout(sys.stderr):  # verl prints
        validate_config(config, use_reference_policy=need_reference_policy(config), use_critic=need_critic(config))
    with failing_as("config", " (resolving interpolations)"):
        OmegaConf.resolve(config)
        return migrate_legacy_reward_impl(config)


def config_dataclasses(config) -> dict:
    """verl's dataclasses for the sections its workers convert (each conversion runs its __post_init__ checks)."""
    from verl.utils.config import omega_conf_to_dataclass

    sections = {"algorithm": config.algorithm, "actor_rollout_ref.actor": config.actor_rollout_ref.actor,
                "actor_rollout_ref.rollout": config.actor_rollout_ref.rollout}
    out = {}
    for name, node in sections.items():
        with failing_as("config", f" (converting {name} to verl's dataclass)"):
            out[name] = omega_conf_to_dataclass(node)
    path = config.actor_rollout_ref.model.path
    with failing_as("model", f" (verl's HFModelConfig loads the config, tokenizer and processor of {path}, not its "
                             "weights: pass --model a local checkpoint directory)"):
        out["model"] = omega_conf_to_dataclass(config.actor_rollout_ref.model)
    if out["model"].processor is None:
        raise DryRunError("model", f"{path} has no processor; the evaluator is a video-language model (Qwen2.5-VL)")
    return out


def check_reward_function(config) -> str:
    """Load the custom reward and the reward manager as verl's RewardLoopWorker does; returns 'path:name via manager'."""
    from verl.trainer.ppo.reward import get_custom_reward_fn, resolve_reward_manager_cls

    spec = config.reward.custom_reward_function
    with failing_as("reward", f" (reward.custom_reward_function path={spec.path} name={spec.name})"):
        if get_custom_reward_fn(config) is None:
            raise ValueError("no reward.custom_reward_function.path: verl would use its default rule rewards, "
                             "which do not know FingER-Instruct")
    with failing_as("reward", " (reward.reward_manager)"):
        manager = resolve_reward_manager_cls(config)
    return f"{spec.path}:{spec.name} via {manager.__name__}"


def check_agent_loop(config) -> type:
    """The class verl's AgentLoopWorker instantiates for `rollout.agent.default_agent_loop`."""
    import hydra
    from omegaconf import OmegaConf

    agent = config.actor_rollout_ref.rollout.agent
    name, path = agent.default_agent_loop, agent.agent_loop_config_path
    with failing_as("agent loop", f" (agent_loop_config_path={path})"):
        from verl.experimental.agent_loop.agent_loop import _agent_loop_registry

        entries = {e.name: e for e in OmegaConf.load(path)} if path else {}
        entry = entries.get(name) or _agent_loop_registry.get(name)
        if entry is None:
            raise ValueError(f"default_agent_loop {name!r} is not defined; defined: "
                             f"{', '.join(sorted(set(entries) | set(_agent_loop_registry)))}")
        return hydra.utils.get_class(entry["_target_"])


# ---- 5: the parquet rows -----------------------------------------------------------------------------


def check_row(row: dict, where: str) -> dict:
    """One verl parquet row as the evaluator's run needs it; returns its first video's dict. Raises DryRunError."""
    def fail(message):
        raise DryRunError("data", f"{where}: {message}")

    for key in ("data_source", "prompt", "reward_model", "videos"):
        if row.get(key) is None:
            fail(f"no {key!r} (write the parquet with instruct_to_verl)")
    truth = dict(row["reward_model"]).get("ground_truth")
    if not isinstance(truth, str) or truth.strip().lower() not in ANSWERS:
        fail(f"reward_model.ground_truth must be 'Yes' or 'No', got {truth!r}")
    messages = [dict(m) for m in row["prompt"]]
    if not messages or any(not isinstance(m.get("content"), str) or "role" not in m for m in messages):
        fail("prompt must be a non-empty list of {role, content: str} messages")
    text = "".join(m["content"] for m in messages)
    videos = [dict(v) for v in row["videos"]]
    if text.count("<video>") != len(videos) or len(videos) != 1:
        fail(f"needs exactly one video and one <video> in the prompt; has {len(videos)} video(s) and "
             f"{text.count('<video>')} <video>")
    others = [p for p in PLACEHOLDERS if p != "<video>" and p in text]
    if others:
        fail(f"prompt contains {', '.join(others)}, but the row has no such media")
    video = videos[0]
    if not isinstance(video.get("video"), str) or not Path(video["video"]).is_file():
        fail(f"video file {video.get('video')!r} not found")
    return video


def read_rows(files) -> list[tuple[str, dict]]:
    """(where, row) for every row of a parquet file or list of files (verl's data.train_files / val_files)."""
    import pandas as pd

    out = []
    for path in [files] if isinstance(files, str) else list(files):
        if not Path(path).is_file():
            raise DryRunError("data", f"parquet file {path} not found")
        with failing_as("data", f" (reading {path})"):
            frame = pd.read_parquet(path)
        out += [(f"{path} row {i}", row) for i, row in enumerate(frame.to_dict("records"))]
    return out


def check_data(config, report: DryRunReport) -> None:
    for split in ("train", "val"):
        rows = read_rows(config.data[f"{split}_files"])
        if not rows:
            raise DryRunError("data", f"data.{split}_files has no rows")
        videos = [check_row(row, where) for where, row in rows]
        sampling = sorted({tuple(v.get(k) for k in ("fps", "max_frames", "max_pixels")) for v in videos}, key=str)
        shown = "; ".join(f"fps {f}, <= {n} frames, <= {p} pixels" for f, n, p in sampling[:3])
        report.add("data" if split == "train" else "", f"{split}: {len(rows)} rows, videos at {shown}")


# ---- 6: verl's agent loop with a scripted rollout, and its reward worker -------------------------------


class ScriptedRollout:
    """Stands where verl's LLM server client stands (`await generate(...) -> TokenOutput`), answering the
    completions it is given, in order, instead of sampling: the dry run's stand-in for the GPU rollout."""

    def __init__(self, tokenizer):
        self.tokenizer, self.completions = tokenizer, []

    async def generate(self, *, prompt_ids, **_):
        from verl.workers.rollout.replica import TokenOutput

        text = self.completions.pop(0) + self.tokenizer.eos_token
        return TokenOutput(token_ids=self.tokenizer.encode(text, add_special_tokens=False), stop_reason="completed")


class InProcessActor:
    """A Ray actor handle's call shape (`await handle.method.remote(...)`) for an object in this process,
    so verl's agent loop calls its RewardLoopWorker without a Ray cluster."""

    def __init__(self, target):
        self._target = target

    def __getattr__(self, name):
        method = getattr(self._target, name)

        class _Remote:
            remote = staticmethod(method)

        return _Remote


def agent_loop_worker(config):
    """verl's AgentLoopWorker, built in this process, with the scripted rollout and a local RewardLoopWorker;
    and the event loop to run it on (the reward worker's: its manager schedules on that loop)."""
    from verl.experimental.agent_loop.agent_loop import AgentLoopWorker
    from verl.experimental.reward_loop.reward_loop import RewardLoopWorker

    with failing_as("reward", " (building verl's RewardLoopWorker)"):
        rewarder = RewardLoopWorker(config)
    with failing_as("rollout", " (building verl's AgentLoopWorker)"):
        worker = AgentLoopWorker(config, llm_client=None, reward_loop_worker_handles=[InProcessActor(rewarder)])
    worker.llm_client = ScriptedRollout(worker.tokenizer)
    return worker, rewarder.loop


def run_completion(worker, loop, row: dict, completion: str, where: str):
    """One trajectory of the configured agent loop on a dataset row, answering `completion`."""
    worker.llm_client.completions = [completion]
    trajectory = {"step": 0, "sample_index": 0, "rollout_n": 0, "validate": False}
    sampling = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": False}
    name = worker.rollout_config.agent.default_agent_loop
    with failing_as("rollout", f" ({where}, agent loop {name})"):
        return loop.run_until_complete(worker._run_agent_loop(sampling, trajectory, agent_name=name, **row))


def describe_inputs(worker, output, where: str) -> tuple[str, bool]:
    """Prompt tokens, video tensors and rope positions of one agent-loop output; True if the positions are
    `finger_reward.rope`'s (the original Qwen-VL ones, as vLLM samples with). Raises DryRunError on an inconsistency."""
    mm = output.multi_modal_inputs or {}
    grid = mm.get("video_grid_thw")
    mask = output.attention_mask[0].bool()
    prompt_len = int(output.attention_mask[0, : output.prompt_ids.shape[1]].sum())
    ids = output.input_ids[0][mask][None]
    video_id = worker.processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    merge = worker.processor.video_processor.merge_size ** 2
    if grid is None or int((ids == video_id).sum()) != int(grid.prod(-1).sum()) // merge:
        raise DryRunError("rollout", f"{where}: {int((ids == video_id).sum())} video tokens in the prompt, but the "
                                     f"video grid {None if grid is None else grid.tolist()} needs "
                                     f"{None if grid is None else int(grid.prod(-1).sum()) // merge}")
    if output.position_ids.shape != (1, 4, output.input_ids.shape[1]):
        raise DryRunError("rollout", f"{where}: position ids of shape {tuple(output.position_ids.shape)}, verl's actor "
                                     f"expects (1, 4, {output.input_ids.shape[1]})")
    layout = RopeLayout.from_config(worker.model_config.hf_config)
    want, _ = rope_positions(layout, ids, video_grid_thw=grid, second_per_grid_ts=mm.get("second_per_grid_ts"))
    original = torch.equal(output.position_ids[0, 1:][:, mask], want[:, 0])
    pixels = tuple(mm["pixel_values_videos"].shape)
    spg = mm.get("second_per_grid_ts")
    text = (f"{prompt_len} prompt tokens ({int((ids == video_id).sum())} video), video grid {grid[0].tolist()}, "
            f"pixel_values_videos {pixels}, second_per_grid_ts {None if spg is None else [round(float(s), 4) for s in spg]}")
    return text, original


def check_rewards(output, kind: str, expected: tuple[str, float, float], weights: tuple[float, float], where: str) -> dict:
    """The reward verl's reward loop gave one sample completion, against FingER Eq. 9-11."""
    _, acc, fmt = expected
    info = output.extra_fields.get("reward_extra_info") or {}
    got = {"score": output.reward_score, "acc": info.get("acc"), "format": info.get("format")}
    if got["score"] is None:
        raise DryRunError("rewards", f"{where}: verl's reward loop gave the {kind} completion no score")
    if got["acc"] is None or got["format"] is None:
        raise DryRunError("rewards", f"{where}: the reward function returned no 'acc'/'format' keys "
                                     "(FingER's reward is finger_reward.integrations.verl_evaluator.compute_score)")
    want = {"score": weights[0] * acc + weights[1] * fmt, "acc": acc, "format": fmt}
    if any(abs(float(got[k]) - want[k]) > 1e-6 for k in want):
        raise DryRunError("rewards", f"{where}: the {kind} completion got {got}, FingER Eq. 9-11 give {want}")
    return got


def check_rollouts(config, report: DryRunReport, rows: int) -> None:
    from verl.trainer.ppo.utils import create_rl_dataset

    worker, loop = agent_loop_worker(config)
    with failing_as("rollout", f" (verl's dataset class on {config.data.train_files})"):
        dataset = create_rl_dataset(config.data.train_files, config.data, worker.tokenizer, worker.processor)
    kwargs = dict(config.reward.custom_reward_function.get("reward_kwargs") or {})
    weights = (float(kwargs.get("accuracy_weight", 1.0)), float(kwargs.get("format_weight", 1.0)))
    positions = []
    for i in range(min(rows, len(dataset))):
        where = f"train row {i}"
        row = dataset[i]
        truth = row["reward_model"]["ground_truth"]
        for kind, expected in sample_completions(truth).items():
            output = run_completion(worker, loop, row, expected[0], where)
            text, original = describe_inputs(worker, output, where)
            report.rewards[kind] = check_rewards(output, kind, expected, weights, where)
        positions.append(original)
        report.prompts.append(output.prompt_ids[0][output.attention_mask[0, : output.prompt_ids.shape[1]].bool()].tolist())
        report.add("rollout" if i == 0 else "", f"{where} ({type(dataset).__name__}): {text}")
    loop = worker.rollout_config.agent.default_agent_loop
    if all(positions):
        report.add("rope", f"agent loop {loop}: the actor's positions are finger_reward.rope's (original Qwen-VL)")
    else:
        report.warnings.append(f"agent loop {loop} gives the actor other rope positions than the original Qwen-VL "
                               "code (transformers 5.x); vLLM samples with the original: use default_agent_loop=finger_video")
    shown = ", ".join(f"{k} {v['score']:g} (acc {v['acc']:g}, format {v['format']:g})" for k, v in report.rewards.items())
    report.add("rewards", f"{shown}; weights accuracy {weights[0]:g}, format {weights[1]:g} (FingER Eq. 9-11)")


# ---- the whole dry run -------------------------------------------------------------------------------


def missing_packages(config) -> list[str]:
    """Modules the real run imports that are not installed here (they are needed where it trains)."""
    need = {}
    name = config.actor_rollout_ref.rollout.name
    if name in ROLLOUT_PACKAGES:
        need[ROLLOUT_PACKAGES[name]] = f"actor_rollout_ref.rollout.name={name}"
    if config.trainer.get("use_v1", True):
        need["transfer_queue"] = "verl's v1 trainer, main_ppo's TaskRunnerV1: pip install TransferQueue"
    return [f"{module} ({why})" for module, why in need.items() if importlib.util.find_spec(module) is None]


def dry_run(overrides: list[str], *, rows: int = 1) -> DryRunReport:
    """Run every check up to verl's first GPU call on `overrides` (verl's `main_ppo` command line).
    What verl prints goes to stderr: the launcher's stdout is the command alone."""
    if rows < 1:
        raise ValueError(f"rows={rows}: the dry run checks at least one row through verl's agent loop")
    with contextlib.redirect_stdout(sys.stderr):
        return _checks(overrides, rows)


def _checks(overrides: list[str], rows: int) -> DryRunReport:
    report = DryRunReport()
    config = resolve_config(overrides)
    classes = config_dataclasses(config)
    actor, rollout, algo = (classes[k] for k in ("actor_rollout_ref.actor", "actor_rollout_ref.rollout", "algorithm"))
    kl = f"beta={actor.kl_loss_coef:g} ({actor.kl_loss_type} in the loss)" if actor.use_kl_loss else "no KL loss"
    report.add("config", f"{algo.adv_estimator}: G={rollout.n}, {kl}, clip {actor.clip_ratio_low:g}/"
                         f"{actor.clip_ratio_high:g}, mu={actor.ppo_epochs}, lr {actor.optim.lr:g}, loss "
                         f"{actor.loss_agg_mode}; {config.trainer.nnodes} x {config.trainer.n_gpus_per_node} GPUs, "
                         f"{config.trainer.total_training_steps} steps, rollout {rollout.name}")
    model = classes["model"]
    report.add("model", f"{config.actor_rollout_ref.model.path} ({model.hf_config.model_type}, "
                        f"{type(model.processor).__name__})")
    report.add("reward", check_reward_function(config))
    cls = check_agent_loop(config)
    report.add("agent loop", f"{config.actor_rollout_ref.rollout.agent.default_agent_loop}: {cls.__module__}.{cls.__qualname__}")
    check_data(config, report)
    check_rollouts(config, report, rows)
    missing = missing_packages(config)
    if missing:
        report.warnings.append("not installed here, needed where it trains: " + "; ".join(missing))
    return report
