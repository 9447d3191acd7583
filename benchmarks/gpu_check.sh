#!/usr/bin/env bash
# MoFO on a CUDA GPU, in one run of at most 10 minutes (the three time limits) on one H200: the CUDA tests with compiled Triton kernels (no
# interpreter), the host synchronisations per step of each path, and the optimizer-step benchmark (torch's fused
# AdamW, the topk reference, MoFO with torch operations, MoFO's Triton kernels, exact and sampled) on GPT-2-small and
# Llama-2-7B 2-layer shapes in float32 and bfloat16.
#
#   benchmarks/gpu_check.sh [OUT_DIR]     # default: $OUT if set, else benchmarks/results/gpu_check
#
# Writes OUT_DIR/environment.txt, tests.txt (+ tests.xml), syncs.txt, optimizer_step_cuda.md and summary.txt;
# every part runs under its own time limit and the script always ends with the summary, so one run gives whatever
# it could. Needs the project installed with its dev extra (pytest, triton) and a CUDA build of torch.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-benchmarks/results/gpu_check}}"
mkdir -p "$OUT_DIR"
unset TRITON_INTERPRET  # the compiled kernels
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)
status() { echo "$1: exit $2 after $(($(date +%s) - start)) s" | tee -a "$OUT_DIR/summary.txt"; }
: > "$OUT_DIR/summary.txt"

{
  date -u
  nvidia-smi || true
  python -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', \
torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE')"
  python -c "import triton; print('triton', triton.__version__)" || echo "triton missing"
} > "$OUT_DIR/environment.txt" 2>&1
status environment $?

# 1. The CUDA tests: every cuda variant of tests/test_mofo_triton.py (Triton == C kernels bit for bit, the topk
#    mask through every repair branch, weights within 2 ulps of torch operations, sampled bound, AdamW at
#    fraction=1, resume, launches, no host synchronisation in a step, the eager CUDA path against the CPU one).
timeout 240 python -m pytest -q -p no:cacheprovider -rs tests/test_mofo_triton.py -k "not interpreter" \
  --junitxml="$OUT_DIR/tests.xml" > "$OUT_DIR/tests.txt" 2>&1
status "tests (tests.txt)" $?
python - "$OUT_DIR/tests.xml" >> "$OUT_DIR/summary.txt" 2>&1 <<'PY'
import sys
import xml.etree.ElementTree as ET

outcome = {"passed": 0, "failed": 0, "skipped": 0}
cuda = dict(outcome)
for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
    kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
    kind = "passed" if not kinds else ("skipped" if kinds == ["skipped"] else "failed")
    outcome[kind] += 1
    if "cuda" in case.get("name", ""):
        cuda[kind] += 1
print(f"  tests: {outcome}; of them on CUDA: {cuda} (all skipped means no GPU was seen)")
PY

# 2. Host synchronisations per optimizer step (torch's sync debug mode counts them), for 8 and 64 tensors.
timeout 60 python - > "$OUT_DIR/syncs.txt" 2>&1 <<'PY'
import warnings

import torch

from lit_mofo import MoFO

device = torch.device("cuda")
print("host synchronisations in one MoFO step (torch.cuda.set_sync_debug_mode('warn')), bfloat16 parameters:")
for tensors in (8, 64):
    params = [torch.nn.Parameter(torch.randn(512, 768, device=device, dtype=torch.bfloat16)) for _ in range(tensors)]
    params += [torch.nn.Parameter(torch.randn(768, device=device, dtype=torch.bfloat16)) for _ in range(tensors)]
    for fused in (False, True):
        for selection in ("exact", "sampled"):
            optimizer = MoFO(params, lr=1e-3, selection=selection, sample_size=4096, fused=fused)
            for p in params:
                p.grad = torch.randn_like(p)
            optimizer.step()
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                optimizer.step()
                torch.cuda.set_sync_debug_mode("default")
            syncs = sum("synchroniz" in str(w.message) for w in caught)
            path = "Triton (fused=True)" if fused else "torch ops (fused=False)"
            print(f"{2 * tensors:4d} tensors, {path:24s} {selection:8s}: {syncs} synchronisations")
PY
status "host syncs (syncs.txt)" $?

# 3. The benchmark: 2 warm-up rounds (Triton compiles in the first), 7 measured, memory per method.
timeout 300 python benchmarks/optimizer_step.py --device cuda --no-compile-cost \
  --markdown "$OUT_DIR/optimizer_step_cuda.md" > "$OUT_DIR/optimizer_step_cuda.log" 2>&1
status "benchmark (optimizer_step_cuda.md)" $?
echo "total $(($(date +%s) - start)) s" | tee -a "$OUT_DIR/summary.txt"
