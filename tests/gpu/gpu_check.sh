#!/usr/bin/env bash
# The prepared GPU check (issue 19), for a bare GPU machine: a fresh clone, no .venv, pip reaching PyPI.
#
#   bash tests/gpu/gpu_check.sh        (or: make gpu-check)
#
# 1. Is there a GPU? nvidia-smi, else torch if one is installed. None: one line, exit 2, nothing written.
# 2. make install when .venv is missing (a registry must answer first, else one line and exit 1).
#    PyPI's torch==2.14.1 for Linux x86_64 is the CUDA 13.0 build (2.14.1+cu130, with the nvidia-*-cu13
#    runtime wheels: cuBLAS, cuDNN 9, NCCL); it needs an NVIDIA driver >= 580.
#    An older driver: torch sees no GPU, and the cu126 build is tried instead.
# 3. make test-gpu (tests/gpu), then make bench DEVICE=cuda BENCH_ARGS=--quick (40 images).
# 4. faiss-gpu from PyPI (CUDA 12 runtime wheels) into .venv/faiss-gpu, apart from the venv's faiss-cpu,
#    if it installs within its time; then the faiss GPU test again with it on PYTHONPATH.
# 5. With time left, the bench's full workload (411 images: 322k x 1024 patches), lines kept if cut short.
#
# Every step runs under `timeout`, within one overall budget (GPU_CHECK_BUDGET_S, default 540 s: steps
# 3-5 fit the 8 minutes the issue allows after the install). Logs, nvidia-smi's output, versions, the
# bench's JSON lines and summary.txt go to $OUT if set, else outputs/gpu_check/<timestamp>/.
# Exit: 0 every step passed, 1 a step failed or timed out, 2 no GPU, 3 a GPU that torch cannot use.
set -u

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$REPO" || exit 1
PY=.venv/bin/python
BUDGET_S=${GPU_CHECK_BUDGET_S:-540}
BENCH_QUICK_ARGS=${BENCH_QUICK_ARGS:---quick}
BENCH_FULL_ARGS=${BENCH_FULL_ARGS:---images 411}
TORCH_FALLBACK_INDEX=${TORCH_FALLBACK_INDEX:-https://download.pytorch.org/whl/cu126}
TORCH_FALLBACK_PINS=${TORCH_FALLBACK_PINS:-torch==2.14.1+cu126 torchvision==0.29.1+cu126}
# make test-gpu once the main Makefile includes Makefile.gpu; until then, both files named
MAKE_GPU=(make -s)
grep -q '^include Makefile.gpu' Makefile || MAKE_GPU=(make -s -f Makefile -f Makefile.gpu)
# faiss-gpu 1.15.1 (the venv's faiss-cpu version) and the CUDA 12 runtime its wheel declares
FAISS_GPU_PINS=(faiss-gpu==1.15.1 "nvidia-cuda-runtime-cu12>=12.6,<13" "nvidia-cublas-cu12>=12.6,<13"
                "nvidia-curand-cu12>=10.3.7,<11")
FAISS_DIR=.venv/faiss-gpu

# ------------------------------------------------------------------ 1. a GPU, before anything else
torch_gpu() {  # the GPU's name as torch sees it, or nothing
    timeout 120 "$1" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" \
        2>/dev/null | tail -n 1
}
gpu=""
if command -v nvidia-smi >/dev/null 2>&1; then
    gpu=$(timeout 30 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
fi
if [ -z "$gpu" ]; then  # no nvidia-smi (some containers): ask an installed torch
    for python in "$PY" python3; do
        if command -v "$python" >/dev/null 2>&1; then
            gpu=$(torch_gpu "$python")
            [ -n "$gpu" ] && break
        fi
    done
fi
if [ -z "$gpu" ]; then
    echo "gpu_check: no GPU on this machine (no nvidia-smi lists one, torch.cuda.is_available() is False): nothing run"
    exit 2
fi

# ------------------------------------------------------------------ the output folder and the steps
OUT=${OUT:-outputs/gpu_check/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SUMMARY=$OUT/summary.txt
START=$SECONDS
failed=0
printf 'gpu_check %s\ngpu: %s\nbudget: %s s\n\n%-12s %-9s %8s  %s\n' "$(date -u +%FT%TZ)" "$gpu" "$BUDGET_S" \
    step status seconds log > "$SUMMARY"

left() { echo $((BUDGET_S - (SECONDS - START))); }

# step NAME MAX_SECONDS COMMAND...: run under timeout (at most what the budget has left), log to NAME.log
step() {
    local name=$1 limit=$2 status rc began
    shift 2
    [ "$(left)" -lt "$limit" ] && limit=$(left)
    if [ "$limit" -lt 20 ]; then
        printf '%-12s %-9s %8s  %s\n' "$name" skipped 0 "(out of time)" >> "$SUMMARY"
        failed=1
        return 1
    fi
    began=$SECONDS
    echo "gpu_check: $name (up to ${limit}s)"
    timeout --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout ;;
        *) status="failed:$rc" ;;
    esac
    printf '%-12s %-9s %8s  %s\n' "$name" "$status" $((SECONDS - began)) "$name.log" >> "$SUMMARY"
    [ "$rc" -ne 0 ] && failed=1
    return "$rc"
}

versions() {
    "$PY" - <<'EOF'
import platform, subprocess
import torch
print("python", platform.python_version())
print("torch", torch.__version__, "cuda build", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("cuda available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.1f} GiB", f"sm_{p.major}{p.minor}", "count", torch.cuda.device_count())
try:
    import faiss
    print("faiss", faiss.__version__, "gpus", faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0)
except ImportError:
    print("faiss missing")
print("commit", subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip())
EOF
}

{ nvidia-smi; nvidia-smi -q; } > "$OUT/nvidia-smi.txt" 2>&1

# ------------------------------------------------------------------ 2. the environment
# pip retries a registry it cannot reach for minutes: one wheel that make install needs, within a minute
registry_reachable() {
    local tmp rc
    python3 -m pip --version > /dev/null 2>&1 || return 0  # no pip outside a venv: let make install say
    tmp=$(mktemp -d)
    timeout 60 python3 -m pip download --quiet --no-deps --dest "$tmp" torchvision==0.29.1 > "$OUT/registry.log" 2>&1
    rc=$?
    rm -rf "$tmp"
    return "$rc"
}
if [ ! -x "$PY" ] || [ ! -f .venv/.installed ]; then
    if ! registry_reachable; then
        echo "gpu_check: no .venv and no package registry reachable (registry.log): make install cannot run here" \
            | tee -a "$SUMMARY"
        exit 1
    fi
    step install 360 make install || { cat "$SUMMARY"; exit 1; }
fi
if [ -z "$(torch_gpu "$PY")" ]; then  # the driver is older than torch's CUDA build
    # the CUDA 12.6 build (and its nvidia-*-cu12 wheels) runs on drivers >= 525
    # shellcheck disable=SC2086  # the pins are words
    step torch-cu126 240 "$PY" -m pip install $TORCH_FALLBACK_PINS --index-url "$TORCH_FALLBACK_INDEX"
    if [ -z "$(torch_gpu "$PY")" ]; then
        versions > "$OUT/versions.txt" 2>&1
        echo "gpu_check: nvidia-smi lists '$gpu' but torch cannot use it (versions.txt, nvidia-smi.txt)" \
            | tee -a "$SUMMARY"
        exit 3
    fi
fi
versions > "$OUT/versions.txt" 2>&1

# ------------------------------------------------------------------ 3. the GPU tests, the quick bench
step test-gpu 200 "${MAKE_GPU[@]}" test-gpu
bench() {  # bench NAME MAX_SECONDS ARGS: JSON lines (stdout) to NAME.jsonl, the table (stderr) to NAME.log
    local name=$1 limit=$2 rc
    step "$name" "$limit" bash -c "make -s bench DEVICE=cuda BENCH_ARGS='$3 --root outputs/$name' > '$OUT/$name.stdout'"
    rc=$?
    grep '^{' "$OUT/$name.stdout" > "$OUT/$name.jsonl" 2>/dev/null  # also the lines of a run cut short
    cp "outputs/$name/table.md" "$OUT/$name.table.md" 2>/dev/null
    return "$rc"
}
bench bench-quick 240 "$BENCH_QUICK_ARGS"

# ------------------------------------------------------------------ 4. faiss with GPU support
if step faiss-gpu 120 "$PY" -m pip install --quiet --no-deps --target "$FAISS_DIR" "${FAISS_GPU_PINS[@]}"; then
    step test-faiss 90 env PYTHONPATH="$REPO/$FAISS_DIR" "$PY" -m pytest -q -m gpu tests/gpu/test_gpu_search.py \
        -k faiss -rA
fi

# ------------------------------------------------------------------ 5. the full workload with the time left
if [ "$(left)" -ge 180 ]; then
    bench bench-full "$(left)" "$BENCH_FULL_ARGS" || echo "(bench-full: the lines measured before it stopped" \
        "are in bench-full.jsonl)" >> "$SUMMARY"
fi

printf '\ntotal: %s s; exit %s\n' $((SECONDS - START)) "$failed" >> "$SUMMARY"
cat "$SUMMARY"
echo "gpu_check: everything is in $OUT"
exit "$failed"
