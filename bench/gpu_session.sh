#!/usr/bin/env bash
# Issue 7's GPU measurements (item 6) on a lent machine (the `device` tool), one part per call so
# that each stays well under its 10-minute limit:
#
#   bash bench/gpu_session.sh tests   # the CUDA tests: flat varlen kernel, chunked loss, compile
#   bash bench/gpu_session.sh mfu     # bench/mfu.py: defaults, loss chunk sizes, sdpa, compile
#   bash bench/gpu_session.sh peers   # bench/vs_peers.py sft and pretrain in bf16, one repeat
#   bash bench/gpu_session.sh sweep   # sweeps on CUDA: grid, resume after kill, multirun; overhead
#   bash bench/gpu_session.sh results # predictions.jsonl on CUDA (per-row chunked loss, batched greedy
#                                     # generation with left padding), eval --baseline, report size
#   bash bench/gpu_session.sh serve   # lmforge serve on CUDA through the openai client (streaming,
#                                     # 8 concurrent clients, cancellation), bench/serve.py figures;
#                                     # train.mirror + --resume auto from a moto server in bf16
#   bash bench/gpu_session.sh controls # issue 23 on CUDA: every optimizer's exact resume (the 8-bit
#                                     # ones only run here), train.lr=find's bit-exact restore in bf16,
#                                     # curriculum resume, GPT-2/Qwen2 from scratch with varlen
#   bash bench/gpu_session.sh scaleout # issue 24 on CUDA: FSDP (bf16 mixed precision, sharded
#                                     # checkpoint, resume) on every GPU there is, DeepSpeed ZeRO-2/3
#                                     # (never run before), adapter-only checkpoint sizes
#
# The machine has torch, transformers and pytest but not every package lmforge needs: the
# missing ones travel as wheels in .whl (ignored; the device tool's `carry: [".whl"]`). Logs go
# to $OUT (the device tool's folder that comes back), else /tmp/gpu-session. Record the figures in
# bench/RESULTS.md with the hardware and the date.
set -euo pipefail
case "${1:-}" in
tests | mfu | peers | sweep | results | serve | controls | scaleout) ;;
*)
    echo "usage: bash bench/gpu_session.sh tests|mfu|peers|sweep|results|serve|controls|scaleout" >&2
    exit 2
    ;;
esac
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/gpu-session}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=src
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=src:/tmp/site
fi
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} | tee "$out/machine.txt"

case "${1:-}" in
tests)
    python3 -m pytest -q -p no:cacheprovider tests/unit/test_varlen_attention.py tests/unit/test_chunked_loss.py \
        tests/unit/test_no_device_reads.py \
        tests/unit/test_model_and_optim.py 2>&1 | tee "$out/tests.log"
    ;;
mfu)
    # the default (auto chunks: 2048 targets at vocab 32k on CUDA), the CPU's chunk size, Liger's,
    # transformers' sdpa with its block-diagonal mask instead of the flat varlen kernel, compiled
    for args in "" "--set train.loss_chunk_size=256" "--set train.loss_chunk_size=512" \
        "--set model.attention=sdpa" "--compile"; do
        # shellcheck disable=SC2086
        python3 bench/mfu.py $args
    done 2>&1 | tee "$out/mfu.log"
    ;;
sweep)
    # trials on the GPU (precision auto: bf16); the resumed trial's weights equal the uninterrupted
    # one's only where CUDA's kernels are deterministic: a difference there is a finding, not noise.
    # Needs optuna, cmaes, sqlalchemy, alembic, colorlog and optuna-dashboard (with bottle) in .whl.
    python3 -m pytest -q -p no:cacheprovider tests/integration/test_sweep.py \
        -k "grid_sweep or interrupted or multirun or diverging" 2>&1 | tee "$out/sweep-tests.log"
    python3 bench/sweep_overhead.py --repeats 1 2>&1 | tee "$out/sweep-overhead.log"
    ;;
results)
    # per-example losses must add up to the packed evaluation's (bf16 here: a tolerance finding is
    # a finding), and batched greedy answers must equal one-at-a-time ones on CUDA's kernels.
    # Needs sacrebleu, rouge-score, scipy, pandas, jinja2, matplotlib in .whl where missing.
    python3 -m pytest -q -p no:cacheprovider tests/integration/test_predictions.py tests/unit/test_stats.py \
        tests/unit/test_analysis.py 2>&1 | tee "$out/results-tests.log"
    python3 bench/report_size.py 2>&1 | tee "$out/report-size.log"
    ;;
serve)
    # Needs fastapi, uvicorn, openai, boto3 and moto[server] (with werkzeug, flask) in .whl where missing.
    # The mirror's bit-exact resume holds where CUDA's kernels are deterministic: a difference is a finding.
    python3 -m pytest -q -p no:cacheprovider tests/integration/test_serve.py tests/integration/test_mirror.py \
        2>&1 | tee "$out/serve-tests.log"
    python3 bench/serve.py 2>&1 | tee "$out/serve.log"
    ;;
controls)
    # Needs lion-pytorch, bitsandbytes, qdrant-client (with its deps) in .whl where missing. The
    # resumes are bit-exact where CUDA's kernels are deterministic: a difference is a finding.
    python3 -m pytest -q -p no:cacheprovider tests/integration/test_optimizers_resume.py \
        tests/integration/test_lr_find.py tests/integration/test_curriculum_runs.py \
        tests/integration/test_architectures.py tests/integration/test_packing.py -m "not slow" 2>&1 | tee "$out/controls-tests.log"
    python3 bench/lr_find_check.py --smoke 2>&1 | tee "$out/lr-find.log"
    ;;
scaleout)
    # Needs deepspeed (and its deps) in .whl for the DeepSpeed runs (CPU-tested over gloo; here they
    # run on NCCL for the first time). With one GPU, FSDP runs as one process (sharded checkpoint
    # format, then a resume); with two or more, across them over NCCL.
    gpus=$(nvidia-smi --list-gpus | wc -l)
    nproc=$((gpus > 1 ? 2 : 1))
    quick=(train.max_steps=40 train.save_every=20 eval.generate.num_examples=1 tracking.backends=[none])
    {
        python3 -m lmforge train examples/quickstart.yaml "${quick[@]}" name=fsdp distributed.strategy=fsdp \
            --nproc "$nproc"
        python3 -m lmforge train examples/quickstart.yaml "${quick[@]}" name=fsdp distributed.strategy=fsdp \
            train.max_steps=60 --resume auto --nproc "$nproc"
        for stage in 2 3; do
            python3 -m lmforge train examples/quickstart.yaml "${quick[@]}" name="zero$stage" \
                distributed.strategy=deepspeed distributed.deepspeed.zero_stage=$stage --nproc "$nproc" || true
            python3 -m lmforge train examples/quickstart.yaml "${quick[@]}" name="zero$stage" train.max_steps=60 \
                distributed.strategy=deepspeed distributed.deepspeed.zero_stage=$stage --resume auto --nproc "$nproc" || true
        done
        python3 bench/checkpoint_size.py
    } 2>&1 | tee "$out/scaleout.log"
    python3 -m pytest -q -p no:cacheprovider tests/integration/test_fsdp.py tests/unit/test_strategy.py \
        tests/integration/test_deepspeed.py tests/integration/test_adapter_checkpoints.py 2>&1 | tee "$out/scaleout-tests.log"
    ;;
peers)
    for workload in sft pretrain; do
        python3 bench/vs_peers.py --workload "$workload" --precision bf16 --repeats 1
    done 2>&1 | tee "$out/peers.log"
    ;;
esac
