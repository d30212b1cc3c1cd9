"""GRPO for the FingER evaluator on verl (FingER Sec. 3.3.3, settings of Sec. 4.2): the multi-GPU launcher.

The same algorithm as `trainers/grpo.py` (G completions per question from the engine's reason-mode
prompt, r = r_accuracy + r_format, group-normalised advantages, clipped surrogate with a KL loss to
the start model), run by verl: vLLM rollouts, FSDP actor and reference, Ray. This script only
prepares the run:

1. FingER-Instruct JSONL -> verl parquet under `<output_dir>/data` (`instruct_to_verl`, with the
   YAML's `finger:` settings);
2. every other key of the YAML -> a Hydra override of verl's ppo_trainer config, plus the model,
   data and output paths, plus the extra overrides given on the command line (those win);
3. the overrides checked as verl's `main_ppo` checks them (Hydra composition, `validate_config`);
4. `python -m verl.trainer.main_ppo <overrides>` in a subprocess; or, with --dry-run, every check up to
   verl's first GPU call (`trainers/verl_dry_run.py`: config, model processor, reward, agent loop, rows,
   and verl's agent loop and reward loop on sample completions), a summary on stderr, the command on stdout.

    python -m finger_reward.trainers.verl_grpo --config configs/verl_grpo.yaml \
        --model Qwen/Qwen2.5-VL-7B-Instruct --train train.jsonl --val val.jsonl \
        [--output_dir out/verl_grpo] [--dry-run [--check-rows 1]] [trainer.n_gpus_per_node=8 ...]

verl 0.9.1 needs GPUs for a step (vLLM/SGLang/TRT-LLM rollouts, NCCL; README says exactly where); the dry run does not.
"""

from __future__ import annotations

import argparse
import logging
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from finger_reward.integrations.verl_evaluator import instruct_to_verl

logger = logging.getLogger(__name__)

VERL_ENTRY = "verl.trainer.main_ppo"
AGENT_LOOP = "finger_video"  # configs/verl_agent_loops.yaml: finger_reward.rope positions in the actor's forward
_PLAIN = re.compile(r"[A-Za-z0-9_./:@+-]+")  # strings Hydra reads unquoted


@dataclass(frozen=True)
class Conversion:
    """The YAML's `finger:` block: how FingER-Instruct JSONL becomes verl's parquet (see `instruct_to_verl`)."""

    mode: str = "reason"
    fps: float = 2.0
    max_pixels: int = 448 * 448
    max_frames: int = 48
    video_root: str | None = None

    @classmethod
    def from_mapping(cls, options: Mapping | None, where: str) -> "Conversion":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options or {}) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)} under 'finger'; valid: {', '.join(sorted(known))}")
        return cls(**dict(options or {}))


# ---- YAML -> Hydra overrides ----------------------------------------------------------------------


def hydra_value(value: Any) -> str:
    """A YAML value in Hydra's override grammar (strings quoted unless they read back as themselves)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        if _PLAIN.fullmatch(value) and isinstance(yaml.safe_load(value), str):
            return value
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as a Hydra override")


def flatten(settings: Mapping, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, leaf value) pairs of a nested mapping; an empty mapping is a leaf."""
    for key, value in settings.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            yield from flatten(value, dotted + ".")
        else:
            yield dotted, value


def compose_verl(overrides: list[str] = ()):
    """verl's ppo_trainer config with `overrides`, composed by Hydra as `main_ppo` composes it
    (Hydra's errors name the bad override)."""
    import verl
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(verl.__file__).parent / "trainer" / "config"), version_base=None):
        return compose(config_name="ppo_trainer", overrides=list(overrides))


def to_overrides(settings: Mapping, defaults, where: str) -> list[str]:
    """Hydra overrides for a nested excerpt of verl's config; a key verl lacks is an error (typos),
    except under a mapping verl leaves empty for users (`data.mm_processor_kwargs`), added with '+'."""
    from omegaconf import DictConfig, OmegaConf

    out = []
    for key, value in flatten(settings):
        parent, _, last = key.rpartition(".")
        node = OmegaConf.select(defaults, parent) if parent else defaults
        if not isinstance(node, DictConfig) or last not in node.keys():
            if not (isinstance(node, DictConfig) and len(node.keys()) == 0):
                raise ValueError(f"{where}: {key} is not a key of verl's ppo_trainer config")
            key = "+" + key
        out.append(f"{key}={hydra_value(value)}")
    return out


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(base: list[str], extra: list[str]) -> list[str]:
    """`base` then `extra`, dropping each base override whose key `extra` sets again (the command line wins)."""
    given = {_override_key(o) for o in extra}
    return [o for o in base if _override_key(o) not in given] + list(extra)


# ---- the run --------------------------------------------------------------------------------------


def build_command(config: str | Path, *, model: str | None, train: str | Path, val: str | Path,
                  output_dir: str | Path | None = None, overrides: list[str] = ()) -> list[str]:
    """Convert the data and return the verl command line (checked against verl's config)."""
    config = Path(config)
    settings = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    conversion = Conversion.from_mapping(settings.pop("finger", None), str(config))
    out = Path(output_dir or settings.get("trainer", {}).get("default_local_dir") or "out/verl_grpo").resolve()
    convert = dict(mode=conversion.mode, fps=conversion.fps, max_pixels=conversion.max_pixels,
                   max_frames=conversion.max_frames, video_root=conversion.video_root)
    train_parquet = instruct_to_verl(train, out / "data" / "train.parquet", split="train", **convert)
    val_parquet = instruct_to_verl(val, out / "data" / "val.parquet", split="val", **convert)
    paths = {"data.train_files": str(train_parquet), "data.val_files": str(val_parquet),
             "trainer.default_local_dir": str(out), "trainer.rollout_data_dir": str(out / "rollouts"),
             "trainer.validation_data_dir": str(out / "validation")}
    if model is not None:
        paths["actor_rollout_ref.model.path"] = str(model)
    if settings.get("actor_rollout_ref", {}).get("rollout", {}).get("agent", {}).get("default_agent_loop") == AGENT_LOOP:
        paths["actor_rollout_ref.rollout.agent.agent_loop_config_path"] = str(resources.files("finger_reward.configs")
                                                                              / "verl_agent_loops.yaml")
    base = to_overrides(settings, compose_verl(), str(config))
    base = merge_overrides(base, [f"{k}={hydra_value(v)}" for k, v in paths.items()])
    final = merge_overrides(base, list(overrides))
    check(final)
    return [sys.executable, "-m", VERL_ENTRY, *final]


def check(overrides: list[str]) -> None:
    """What `main_ppo` does before starting Ray: compose the config and `validate_config` it
    (`verl_dry_run.resolve_config`; a bad override raises DryRunError naming it)."""
    from finger_reward.trainers.verl_dry_run import resolve_config

    resolve_config(overrides)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m finger_reward.trainers.verl_grpo", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="verl GRPO YAML, e.g. configs/verl_grpo.yaml")
    parser.add_argument("--model", default=None, help="start checkpoint (default: the YAML's actor_rollout_ref.model.path)")
    parser.add_argument("--train", required=True, help="FingER-Instruct JSONL for training")
    parser.add_argument("--val", required=True, help="FingER-Instruct JSONL for validation")
    parser.add_argument("--output_dir", default=None, help="parquet, checkpoints and rollouts (default: the YAML's trainer.default_local_dir)")
    parser.add_argument("--dry-run", action="store_true",
                        help="convert the data and check everything up to verl's first GPU call (config, model "
                             "processor, reward, agent loop, rows, rewards of sample completions); print a summary "
                             "(stderr) and the command (stdout); do not train")
    parser.add_argument("--check-rows", type=int, default=1,
                        help="with --dry-run: train rows run through verl's agent loop and reward loop (default 1)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for verl, e.g. trainer.n_gpus_per_node=8")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    from finger_reward.trainers.verl_dry_run import DryRunError, dry_run

    try:
        command = build_command(args.config, model=args.model, train=args.train, val=args.val,
                                output_dir=args.output_dir, overrides=args.overrides)
        if args.dry_run:
            print(dry_run(command[3:], rows=args.check_rows).summary(), file=sys.stderr)
    except DryRunError as err:
        print(f"verl_grpo: {'dry run' if args.dry_run else 'config check'} failed: {err}", file=sys.stderr)
        return 1
    if args.dry_run:
        print(shlex.join(command))
        return 0
    import torch

    if not torch.cuda.is_available():
        logger.warning("no CUDA GPU in this process: verl's vLLM rollouts need GPUs (fine if Ray places them elsewhere)")
    logger.info("running %s", shlex.join(command))
    return subprocess.run(command).returncode


if __name__ == "__main__":
    sys.exit(main())
