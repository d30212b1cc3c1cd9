#!/usr/bin/env bash
# Every figure issues #3 and #7 need from an H100 or H200, in one command, from a fresh clone:
#
#     ./benchmarks/gpu_figures.sh            # about 20-30 minutes on one H100
#
# Installs the project (scripts/setup.sh), runs the GPU-only tests, the 7B engine benchmark
# (answer and reason mode, then answer mode with torch.compile) and both generator loops at
# Wan2.1-T2V-1.3B and LTX-Video 0.9 size, and writes everything to benchmarks/gpu-<device>-<date>.txt for
# benchmarks/RESULTS.md. Each part runs even if an earlier one failed; the exit status is the
# number of parts that failed.
set -uo pipefail
cd "$(dirname "$0")/.."
command -v nvidia-smi >/dev/null || { echo "gpu_figures.sh: no NVIDIA GPU here (nvidia-smi missing)" >&2; exit 1; }
[ -x .venv/bin/python ] || ./scripts/setup.sh || exit 1
device=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-')
out="benchmarks/gpu-${device}-$(date +%Y%m%d).txt"
failed=0
part() {
  echo "===== $* =====" | tee -a "$out"
  "$@" 2>&1 | grep -v -e 'it/s\]' -e 's/it\]' | tee -a "$out"
  [ "${PIPESTATUS[0]}" -eq 0 ] || { failed=$((failed + 1)); echo "(failed)" | tee -a "$out"; }
}
{ nvidia-smi; .venv/bin/python -c "import torch, transformers, diffusers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__)"; } > "$out" 2>&1
part .venv/bin/python -m pytest -q -m gpu tests
part .venv/bin/python benchmarks/engine.py --config 7b --videos 64
part .venv/bin/python benchmarks/engine.py --config 7b --videos 64 --modes answer --compile
part .venv/bin/python benchmarks/diffusers_loops.py --config wan1.3b --steps 3 --grad-accum 2
part .venv/bin/python benchmarks/diffusers_loops.py --config ltx --steps 3 --grad-accum 2
part .venv/bin/python benchmarks/grpo_rollout.py --config 7b --size 448 --seconds 8 --max-new-tokens 256  # issue 16: G=16 rollout, shared prefill vs generate
part .venv/bin/python benchmarks/grpo_step.py --config 7b --size 448 --seconds 24 --completion 256  # a G=16 training pass, clip per forward vs per row
echo "figures in $out ($failed part(s) failed)"
exit "$failed"
