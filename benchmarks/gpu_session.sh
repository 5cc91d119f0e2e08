#!/usr/bin/env bash
# The kernels' GPU verification and measurements, in phases of under 10 minutes each, run
# from a source checkout with no install (PYTHONPATH=.), on a machine that may have no
# package index: only torch, triton, transformers and pytest are needed, plus gymnasium
# for the tests that run real rollouts (on an offline machine, bring its wheels in
# .offline-wheels/: `pip download --no-deps -d .offline-wheels gymnasium farama-notifications`).
#
#   bash benchmarks/gpu_session.sh check    # the kernel tests on the GPU, the accuracy table
#   bash benchmarks/gpu_session.sh tune     # every tile shape of each pass; prints TUNED
#   bash benchmarks/gpu_session.sh kernel   # both kernels against SDPA and FlexAttention
#   bash benchmarks/gpu_session.sh step     # the training forward+backward at real size
#   bash benchmarks/gpu_session.sh agents   # the endpoint against the backend (needs fastapi, uvicorn, openai)
#   bash benchmarks/gpu_session.sh async    # colocated, engine process lock-step and async (needs fastapi, uvicorn, httpx)
#
# Between `tune` and `kernel`, copy the printed TUNED table into
# grpo_lab/kernels/shared_prefix_attention.py (or pass KERNEL_ARGS="--tune-json FILE").
# Logs and JSON go to $OUT (default results/gpu/), one file per step; each step has its
# own time limit, so that one overrunning step still leaves the others' results.
set -uo pipefail
cd "$(dirname "$0")/.."
phase=${1:?"usage: bash benchmarks/gpu_session.sh check|tune|kernel|step|agents|async"}
out=${OUT:-results/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
status=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $out/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "+ [$name, ${limit} s] $*"
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$out/$name.log"
    echo "= $name: exit $rc"
    [ "$rc" -eq 0 ] || status=1
}

if ls .offline-wheels/*.whl >/dev/null 2>&1; then
    $py -m pip install -q --no-index --no-deps .offline-wheels/*.whl || status=1
fi
$py - <<'EOF' | tee "$out/$phase-device.txt"
import torch, triton, transformers
print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}; "
      f"transformers {transformers.__version__}; CUDA {torch.version.cuda}")
EOF

case "$phase" in
check)
    step tests 420 $py -m pytest -q -p no:cacheprovider -p no:hydra_pytest -rs \
        tests/test_kernel.py tests/test_trie.py tests/test_shared_prefix.py
    step accuracy 120 $py benchmarks/kernel.py --accuracy --head-dim 64 128
    ;;
tune)
    step tune 540 $py benchmarks/kernel.py --tune --head-dim 128 64 --workers 12 --tune-json "$out/tuned.json"
    ;;
kernel)
    step kernel-trie 150 $py benchmarks/kernel.py --layout trie --json "$out/kernel-trie.json" ${KERNEL_ARGS:-}
    step kernel 400 $py benchmarks/kernel.py --json "$out/kernel.json" ${KERNEL_ARGS:-}
    ;;
step)
    step step-prefix 300 $py benchmarks/shared_prefix.py --config qwen2.5-1.5b --device cuda --dtype bfloat16 \
        --groups 8 --prefix 2048 --response 256 --groups-per-batch 1 --attention reference triton
    step step-trie 240 $py benchmarks/trie.py --config qwen2.5-1.5b --device cuda --dtype bfloat16 --prompt 2048 \
        --group 4 --answer 256 --observation 128 --turns 5 --attention reference triton
    ;;
agents)
    step agents 300 $py benchmarks/agents.py --hidden 896 --layers 24 --requests 64 --max-tokens 256 \
        --concurrency 1 8 64
    ;;
async)
    step async 540 $py benchmarks/async_training.py --steps 8 --latency 0 --colocated model.tiny_hidden_size=896 \
        model.tiny_num_layers=24 model.tiny_num_heads=14 model.tiny_num_kv_heads=2 model.tiny_intermediate_size=4864 \
        rollout.max_new_tokens=64 trainer.micro_batch_size=16
    ;;
*)
    echo "unknown phase '$phase': check, tune, kernel, step, agents or async" >&2
    exit 2
    ;;
esac
exit $status
