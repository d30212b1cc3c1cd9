"""Local scoring against a served copy of the same checkpoint (vLLM, SGLang, or the project's stand-in).

    python benchmarks/vllm_parity.py --model-dir DIR --print-commands     # the server command for DIR
    vllm serve DIR <those flags> &                                        # or, without vLLM:
    python -m tests.logprob_server --model-dir DIR --port 8000 <those flags> &
    python benchmarks/vllm_parity.py --base-url http://127.0.0.1:8000/v1 --model-dir DIR

Scores the same synthetic clips (finger_reward.synthetic, every question of their prompts) locally
(`FingerReward.from_pretrained(DIR)`, the transformers engine) and through the endpoint
(`FingerReward.from_openai(..., processor=DIR)`, so a server that builds other inputs fails with
the flags to fix), in each mode, and prints per mode the largest |P(Yes)| difference over the
answers read from the generation itself, the questions flagged `missing_variant`, and in reason
mode the reasons that differ and, apart, the answers read after re-sent reason text (a reason the
model ended without `<answer>`: the server re-tokenizes the closed text, the local engine appends
the tags' own tokens, so those differ by construction). fps and max_pixels come from DIR's finger_reward.json, as in
scoring. The goal on the tiny evaluator is <= 1e-4 in answer mode.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile

from finger_reward import FingerReward, pretrained
from finger_reward.engine.openai_backend import DEFAULT_TOP_LOGPROBS
from finger_reward.engine.server_inputs import serve_commands
from finger_reward.synthetic import make_world


class _Reread(logging.Handler):
    """Collects (video, question) of the answers the backend read after re-sent reason text (its warnings)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.questions: set[tuple[str, str]] = set()

    def emit(self, record):
        if "did not reach <answer>" in record.getMessage():
            video, _, _, questions = record.args
            self.questions |= {(video, q) for q in questions}


def compare(args, mode: str, videos: list[str], prompts: list[str], bank: str) -> str:
    """One line: the largest |P(Yes)| difference between local and served scoring of the same clips in `mode`."""
    options = dict(questions=bank, mode=mode, max_new_tokens=args.max_new_tokens)
    local = FingerReward.from_pretrained(args.model_dir, **options).score(videos, prompts)
    reread, log = _Reread(), logging.getLogger("finger_reward.engine.openai_backend")
    log.addHandler(reread)
    log.setLevel(logging.WARNING)  # its warnings name the flagged questions (stderr)
    served = FingerReward.from_openai(args.base_url, args.served_model or args.model_dir, processor=args.model_dir,
                                      top_logprobs=args.top_logprobs, **options).score(videos, prompts)
    log.removeHandler(reread)
    pairs = [(a, b, (mine.video, a.question) in reread.questions)
             for mine, theirs in zip(served, local) for a, b in zip(mine.questions, theirs.questions)]
    same = [abs(a.p_yes - b.p_yes) for a, b, again in pairs if not again]
    flagged = sum(a.missing_variant is not None for a, _, _ in pairs)
    line = (f"{mode}: max |P(Yes)| local vs server = {max(same, default=float('nan')):.2e} over {len(same)} of "
            f"{len(pairs)} questions of {len(videos)} videos; missing_variant flagged: {flagged}")
    if mode == "reason":
        differ = sum(a.reason != b.reason for a, b, _ in pairs)
        again = [abs(a.p_yes - b.p_yes) for a, b, again in pairs if again]
        line += (f"; reasons that differ: {differ}; answers read after re-sent text (left out above): {len(again)}"
                 + (f", max |P(Yes)| among them {max(again):.2e}" if again else ""))
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, help="the served checkpoint's directory (or 'tiny')")
    parser.add_argument("--base-url", help="the server, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--served-model", help="the model's name at the server (default: --model-dir, vLLM's default)")
    parser.add_argument("--modes", default="answer,reason")
    parser.add_argument("--scenes", type=int, default=2, help="synthetic scenes; each gives a clean and 5 broken clips")
    parser.add_argument("--top-logprobs", type=int, default=DEFAULT_TOP_LOGPROBS)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--print-commands", action="store_true", help="print the server commands for --model-dir and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    model_dir = pretrained.resolve(args.model_dir)
    settings = {"fps": 2.0, "max_pixels": 448 * 448, **pretrained.scoring_defaults(model_dir)}
    commands = serve_commands(str(model_dir), fps=settings["fps"], max_pixels=settings["max_pixels"],
                              top_logprobs=args.top_logprobs)
    print(f"server command: {commands['vllm']}")
    if args.print_commands:
        print(f"SGLang (unchecked): {commands['sglang']}")
        return 0
    if not args.base_url:
        parser.error("--base-url is required unless --print-commands")
    with tempfile.TemporaryDirectory() as tmp:
        world = make_world(tmp, num_scenes=args.scenes)
        videos = [str(c.path) for c in world.clips]
        prompts = [c.scene.prompt for c in world.clips]
        for mode in args.modes.split(","):
            print(compare(args, mode.strip(), videos, prompts, str(world.bank_path)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
