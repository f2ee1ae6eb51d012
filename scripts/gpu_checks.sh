#!/usr/bin/env bash
# Every check that needs a GPU, in one command that fits one lent-device call, most important first:
#   1. the CUDA tests (pytest -m cuda): no host sync in Memoria's step, CPU/GPU parity, every model on CUDA,
#      mixed-precision training of the sorting task;
#   2. scripts/bench_memoria.py on CUDA at the paper's three configurations: ours (the models' path replayed as CUDA
#      graphs; default, beside memoria-pytorch 1.1.0; the static-shape / no-validate path; compiled + graphed);
#   3. scripts/bench_step.py at the WikiText-103 shape, fp32 and bf16 (Memoria GPT-2, eager and with the memory
#      step graphed, against plain GPT-2), with torch.profiler tables of where the time goes (profile_step.txt),
#      then the same with every transformer block compiled (compile=true), fp32 then bf16;
#   5. the eager step with fused Adam (fp32 and bf16; the ratios' baseline), then the training step with every block
#      compiled as CUDA graphs (mode=reduce-overhead; Memoria's step graphed, its memory reader and Abstractor
#      compiled with the blocks; the LM loss compiled, as compile=true does; fp32), two rounds in turn; each timed
#      per phase (memory read, blocks, memory write, head + loss, backward, optimizer; CUDA events), and also back
#      to back with one sync at the end (--pipelined); profiles of both (what is left between the graphs); the
#      ratios; then the LM loss alone, eager and compiled (bench_loss.py); part 14 runs its controls;
#   6. profiles of the graphed memory step (LM, the models' path: add and remind as one call, compiled + graphed
#      and graphed; then compiled + graphed scoring the gathered candidates instead of every slot, and with add
#      and remind as two calls): kernels and device time per step;
#   7. scripts/bench_walk.py: the graph walk alone, torch ops against the Triton kernels (both modes, several tiles,
#      warps and chains per program), graphed, at the three configurations' sizes; the parts run after it use the
#      fastest variant (MEMORIA_WALK, see memoria/kernels.py);
#   8. scripts/bench_memory_kv.py: the memory keys/values projections of Memoria GPT-2's 12 blocks, one batched GEMM
#      per memory (what the model does) against one GEMM per block and one wide GEMM over all blocks' weights side
#      by side, forward + backward, fp32 and bf16;
#   9. an experiment: part 5's fp32 Memoria step with inductor's batched-GEMM fusion in the blocks (the memory
#      paths' same-shape weight-gradient GEMMs of a block's backward as one batched GEMM), to set beside part 5;
#  10. part 5's graphed blocks in bf16 (both models);
#  11. scripts/bench_gemm.py: every GEMM of one fp32 training step of each model, timed alone shape by shape under
#      cuBLAS and cuBLASLt (and TF32, for reference), and each 2-D product computed the other way round (Cᵀ = Bᵀ Aᵀ):
#      which shapes lose efficiency, and whether a library or the orientation helps (bench_gemm.py --split-k adds
#      the products split over their reduction: slower for every shape on an H100, docs/benchmarks.md);
#  12. part 5's fp32 graphed Memoria GPT-2 with max_autotune_gemm: inductor times cuBLAS against its own Triton GEMM
#      templates (exact fp32, no TF32) shape by shape and keeps the faster; compiling takes minutes;
#  14. part 5's controls: Memoria GPT-2 with its memory reader and Abstractor left eager (what compiling them with
#      the blocks gains), and with the memory step compiled + graphed (memory.compile=true, a fixed store);
#   9, 12, 14: each also times the eager plain baseline when the call has not (part 5b), and prints the ratios;
#   4. short sorting runs of the five models side by side on the one GPU, plus Memoria GPT-2 with its memory
#      output starting at zero (experiment=sort_quick: L 1000, segments of 256, the paper's lr 2e-4 and fp32,
#      6,400 examples x 2 epochs), stopped by Lightning's max_time if the budget runs out, then tested.
#
# The GPU image has torch, transformers and lightning but not hydra/omegaconf, so their wheels travel in .whl/
# together with transformers (the version tested here) and the reference package (scripts/gpu_wheels.sh downloads
# them). Through the device tool:
#   run(command="bash scripts/gpu_checks.sh", carry=[".whl"], timeout_s=600)
# Environment: BUDGET (seconds for everything, default 540), OUT (where logs and JSON go, default ./gpu_out),
# PARTS (which of 1-12 and 14 to run, in the order given; default "1 2 3"; add 4 when the budget allows the sorting runs),
# SORT_RUNS / SORT_MODELS / SORT_BASE / SORT_ARGS / SORT_EXTRA (the sorting runs, see part 4), STEP_ARGS (more
# options for part 5's bench_step runs, e.g. "--blas-library cublaslt").
set -u
START=$(date +%s)
BUDGET=${BUDGET:-540}
DEADLINE=$((START + BUDGET))
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_checks.log"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
left() { echo $((DEADLINE - $(date +%s))); }
# seconds for a step: at most $1 and what is left, at least 1 (`timeout 0` would mean no limit at all)
limit() { local l; l=$(left); [ "$l" -lt "$1" ] || l=$1; [ "$l" -ge 1 ] || l=1; echo "$l"; }
say() { echo "== $(date -u +%H:%M:%S) [$(left) s left] $*" | tee -a "$LOG"; }

# ---------------------------------------------------------------- set-up: carried wheels, the reference in its own path
if compgen -G ".whl/*.whl" >/dev/null; then
  for whl in .whl/*.whl; do
    case "$whl" in
      *memoria_pytorch*) target=/tmp/refsite ;;
      *) target=/tmp/site ;;
    esac
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" "$whl" \
      >>"$LOG" 2>&1 || say "could not install $whl"
  done
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The reference imports as `memoria` too: its own interpreter wrapper sees only its own site folder.
REF_PY=/tmp/reference-python
printf '#!/bin/sh\nPYTHONPATH=/tmp/refsite exec %s "$@"\n' "$(command -v $PY)" >"$REF_PY"
chmod +x "$REF_PY"
{
  nvidia-smi -L 2>&1
  $PY -c "import torch, transformers, lightning; print('torch', torch.__version__, '| transformers',
transformers.__version__, '| lightning', lightning.__version__, '| cuda', torch.cuda.is_available())"
  $PY -c "import hydra, omegaconf; print('hydra', hydra.__version__, '| omegaconf', omegaconf.__version__)"
} 2>&1 | tee -a "$LOG"

# a later call on the same warm machine keeps the walk variant part 7 found fastest in an earlier one
if [ -z "${MEMORIA_WALK:-}" ] && [ -s /tmp/walk_best.txt ]; then
  export MEMORIA_WALK=$(cat /tmp/walk_best.txt)
  say "MEMORIA_WALK=$MEMORIA_WALK (part 7 of an earlier call)"
fi

# ---------------------------------------------------------------- 1. CUDA tests
part1() {
say "1. pytest -m cuda"
# Only the files that hold CUDA tests: the others need packages (datasets, wandb) the GPU image lacks.
timeout $(limit 240) $PY -m pytest -q -m cuda -p no:cacheprovider -o addopts="" \
  tests/memoria/test_memoria.py tests/memoria/test_graphs.py tests/memoria/test_kernels.py tests/experiment/models tests/experiment/tasks/test_sorting.py \
  tests/experiment/tasks/test_language_modeling.py \
  2>&1 | tee "$OUT/pytest_cuda.txt" | tail -15 | tee -a "$LOG"
}

# ---------------------------------------------------------------- 2. core bookkeeping benchmark
# Variants of ours: defaults (beside the reference), the models' static path, that path replayed as CUDA graphs,
# and compiled + graphed (LM only, with a fixed store size, since every new size compiles again; beside graphed alone
# at the same size; the cap of 1024 LTMs is never reached at this config, about 860 engrams per row).
part2() {
say "2. bench_memoria (cuda)"
while IFS='|' read -r name configs impls variant; do
  # shellcheck disable=SC2086
  timeout $(limit 200) $PY scripts/bench_memoria.py --device cuda --configs $configs \
    --impl $impls $variant --warmup 40 --steps 30 --reference-python "$REF_PY" --timeout 150 \
    --json "$OUT/$name.json" 2>&1 | tail -8 | tee -a "$LOG"
done <<'VARIANTS'
bench_memoria_graph|lm enwik8 sort|ours|--static-shape --no-validate --cuda-graph
bench_memoria|lm enwik8 sort|ours reference|
bench_memoria_static|lm enwik8 sort|ours|--static-shape --no-validate
bench_memoria_compiled|lm|ours|--static-shape --no-validate --cuda-graph --compile --ltm-capacity 1024
bench_memoria_graph_capped|lm|ours|--static-shape --no-validate --cuda-graph --ltm-capacity 1024
VARIANTS
}

# ---------------------------------------------------------------- 3. one training step at the WikiText-103 shape
part3() {
say "3. bench_step (fp32, bf16)"
timeout $(limit 150) $PY scripts/bench_step.py --warmup 20 --steps 30 \
  --json "$OUT/bench_step.json" --profile "$OUT/profile_step.txt" 2>&1 | tail -12 | tee -a "$LOG"
say "3b. bench_step with every block compiled (compile=true)"
timeout $(limit 240) $PY scripts/bench_step.py --warmup 20 --steps 30 --compile-blocks \
  --precisions fp32 --models memoria_gpt2_graphed gpt2 --json "$OUT/bench_step_compiled.json" 2>&1 | tail -12 \
  | tee -a "$LOG"
say "3c. the same in bf16"
timeout $(limit 200) $PY scripts/bench_step.py --warmup 20 --steps 30 --compile-blocks \
  --precisions bf16 --models memoria_gpt2_graphed gpt2 --json "$OUT/bench_step_compiled_bf16.json" 2>&1 \
  | tail -12 | tee -a "$LOG"
}

# ---------------------------------------------------------------- 5. training step: eager against graphed blocks
# The step is bound by the host's kernel launches (about 7 us each on the lent machines), so: the eager step
# (fused Adam, the task's optimizer on a GPU) against every block compiled with mode=reduce-overhead (each
# block's forward and backward replayed as CUDA graphs), two rounds each in turn, with profiles: both precisions
# eager, then fp32 (the issue's target) with graphed blocks; bf16 with graphed blocks is part 10.
part5() {
# the eager baseline first (cheap), then the decisive pair (the controls are part 14): a run stopped at its time
# limit writes no JSON, so each run is kept short enough to finish
say "5b. bench_step: eager, fused Adam (the ratios' baseline)"
# shellcheck disable=SC2086
timeout $(limit 100) $PY scripts/bench_step.py --warmup 20 --steps 30 --rounds 2 ${STEP_ARGS:-} \
  --models memoria_gpt2_graphed gpt2 --phases --pipelined --json "$OUT/bench_step_fused.json" \
  --profile "$OUT/profile_step_fused.txt" 2>&1 | tail -24 | tee -a "$LOG"
say "5. bench_step fp32: compiled blocks as CUDA graphs (reduce-overhead)"
# shellcheck disable=SC2086
timeout $(limit 200) $PY scripts/bench_step.py --warmup 20 --steps 30 --rounds 2 ${STEP_ARGS:-} \
  --compile-blocks --compile-mode reduce-overhead --phases --models memoria_gpt2_graphed gpt2 \
  --pipelined --precisions fp32 --json "$OUT/bench_step_reduce_overhead.json" \
  --profile "$OUT/profile_step_reduce_overhead.txt" 2>&1 | grep -v Warning | tail -14 | tee -a "$LOG"
step_ratios
say "5c. bench_loss: the LM loss forward + backward, sliced / shifted labels / the task's, eager and compiled (fp32)"
timeout $(limit 90) $PY scripts/bench_loss.py --compiled --json "$OUT/bench_loss.json" 2>&1 | tail -6 | tee -a "$LOG"
}

# ---------------------------------------------------------------- 14. part 5's controls
part14() {
say "14. bench_step fp32, CUDA graphs: part 5's controls (companions eager; memory step compiled)"
# shellcheck disable=SC2086
timeout $(limit 240) $PY scripts/bench_step.py --warmup 20 --steps 30 --rounds 2 ${STEP_ARGS:-} \
  --compile-blocks --compile-mode reduce-overhead --models memoria_gpt2_eager_reader memoria_gpt2_compiled \
  --pipelined --precisions fp32 --json "$OUT/bench_step_reduce_overhead_controls.json" 2>&1 | grep -v Warning \
  | tail -10 | tee -a "$LOG"
plain_eager_baseline
step_ratios
}

# Memoria's step against the eager plain step (the issue's target) over every bench_step run of this call so far
step_ratios() {
say "Memoria GPT-2 against plain GPT-2 (scripts/step_ratios.py, this call's bench_step runs)"
$PY scripts/step_ratios.py "$OUT"/bench_step*.json 2>&1 | tee -a "$LOG"
}

# the baseline of the ratios (eager plain GPT-2, fused Adam, fp32) when this call has not timed it yet (part 5b)
plain_eager_baseline() {
[ -f "$OUT/bench_step_fused.json" ] || [ -f "$OUT/bench_step_plain_eager.json" ] && return 0
say "eager plain GPT-2, fp32 (the ratios' baseline)"
timeout $(limit 90) $PY scripts/bench_step.py --warmup 20 --steps 30 --models gpt2 --precisions fp32 --pipelined \
  --json "$OUT/bench_step_plain_eager.json" 2>&1 | tail -4 | tee -a "$LOG"
}

# ---------------------------------------------------------------- 10. part 5's graphed blocks in bf16
part10() {
say "10. bench_step bf16: compiled blocks as CUDA graphs (reduce-overhead)"
timeout $(limit 200) $PY scripts/bench_step.py --warmup 20 --steps 30 --rounds 2 \
  --compile-blocks --compile-mode reduce-overhead --models memoria_gpt2_graphed gpt2 --phases --pipelined \
  --precisions bf16 --json "$OUT/bench_step_reduce_overhead_bf16.json" 2>&1 | grep -v Warning | tail -16 \
  | tee -a "$LOG"
}

# ---------------------------------------------------------------- 6. where the graphed memory step's time goes
part6() {
say "6. bench_memoria profiles (LM: add_and_remind compiled + graphed / graphed; scoring the candidates; two calls)"
for variant in "--cuda-graph --compile --add-and-remind" "--cuda-graph --add-and-remind" \
               "--cuda-graph --compile --add-and-remind --score-slots candidates" "--cuda-graph --compile"; do
  # shellcheck disable=SC2086
  timeout $(limit 160) $PY scripts/bench_memoria.py --device cuda --configs lm --impl ours \
    --static-shape --no-validate --ltm-capacity 1024 $variant --warmup 40 --steps 30 \
    --profile "$OUT/profile_memoria.txt" --timeout 150 2>&1 | tail -1 | tee -a "$LOG"
done
}

# ---------------------------------------------------------------- 7. the graph walk alone: torch ops vs Triton kernel
part7() {
say "7. bench_walk (torch walk vs the Triton kernel, graphed)"
timeout $(limit 180) $PY scripts/bench_walk.py --replays 20 --json "$OUT/bench_walk.json" \
  --best-to /tmp/walk_best.txt 2>&1 | tee "$OUT/bench_walk.txt" | tail -40 | tee -a "$LOG"
# the parts after this one run with the fastest kernel variant (unless MEMORIA_WALK was given)
if [ -z "${MEMORIA_WALK:-}" ] && [ -s /tmp/walk_best.txt ]; then
  export MEMORIA_WALK=$(cat /tmp/walk_best.txt)
  say "later parts run with MEMORIA_WALK=$MEMORIA_WALK"
fi
}

# ---------------------------------------------------------------- 8. memory K/V projection: one batched GEMM vs per block
part8() {
say "8. bench_memory_kv (12 blocks' memory projections: batched over the blocks vs per block vs one wide GEMM)"
timeout $(limit 90) $PY scripts/bench_memory_kv.py 2>&1 | grep -v "^\[transformers\]" \
  | tee "$OUT/bench_memory_kv.txt" | tail -4 | tee -a "$LOG"
}

# ---------------------------------------------------------------- 9. batched-GEMM fusion in the compiled blocks
part9() {
say "9. bench_step fp32, blocks as CUDA graphs, with inductor's batch_linear_post_grad fusion"
timeout $(limit 200) $PY scripts/bench_step.py --warmup 20 --steps 30 --compile-blocks \
  --compile-mode reduce-overhead --precisions fp32 --models memoria_gpt2_graphed --phases --pipelined \
  --inductor-options '{"post_grad_fusion_options": {"batch_linear_post_grad": {"min_fuse_set_size": 2}}}' \
  --json "$OUT/bench_step_batch_fusion.json" 2>&1 | grep -v Warning | tail -12 | tee -a "$LOG"
plain_eager_baseline
step_ratios
}

# ---------------------------------------------------------------- 11. the step's GEMMs, shape by shape, per BLAS library
part11() {
say "11. bench_gemm (fp32 step GEMMs: cuBLAS vs cuBLASLt, the other way round, TF32 for reference)"
timeout $(limit 150) $PY scripts/bench_gemm.py --tf32 --transposed --json "$OUT/bench_gemm.json" 2>&1 \
  | grep -v "^\[transformers\]" | tee "$OUT/bench_gemm.txt" | sed -n 1,20p | tee -a "$LOG"
}

# ---------------------------------------------------------------- 12. graphed blocks with autotuned GEMMs
# Memoria's extra fp32 GEMMs (1,200 x 768 x 768 and their gradients; by the kernel counts, cuBLAS's 128 x 256 tiles,
# 30 on 132 SMs) and the memory attentions' tiny batched matmuls: inductor's max_autotune_gemm times its Triton templates
# (other tile shapes) against cuBLAS for every GEMM of a block and keeps whichever is faster. GEMMs only: the
# max-autotune mode also tunes every other kernel (coordinate descent), which did not finish compiling in 360 s.
part12() {
say "12. bench_step fp32: blocks compiled with autotuned GEMMs (max_autotune_gemm; CUDA graphs)"
timeout $(limit 360) $PY scripts/bench_step.py --warmup 20 --steps 30 --compile-blocks --compile-mode reduce-overhead \
  --inductor-options '{"max_autotune_gemm": true}' --precisions fp32 --models memoria_gpt2_graphed --phases \
  --pipelined --json "$OUT/bench_step_autotuned_gemm.json" 2>&1 | grep -v Warning | grep -v "^  triton_\|AUTOTUNE" \
  | tail -10 | tee -a "$LOG"
plain_eager_baseline
step_ratios
}

# ---------------------------------------------------------------- 4. sorting, every model, side by side
# SORT_RUNS: one run per line, "<name> <model> [more overrides]"; default: the five *_sort models with SORT_ARGS,
# plus Memoria with memoria_zero_init_memory_output=true.
# SORT_BASE goes to every run; SORT_ARGS to each default run (the paper's lr 2e-4 and fp32 come from the preset).
SORT_BASE=${SORT_BASE:-task.data.num_train=6400 trainer.max_epochs=2 trainer.log_every_n_steps=10}
SORT_ARGS=${SORT_ARGS:-}
SORT_MODELS=${SORT_MODELS:-memoria_gpt2_sort gpt2_sort transformer_xl_sort compressive_sort infinity_former_sort}
if [ -z "${SORT_RUNS:-}" ]; then
  SORT_RUNS=$(for model in $SORT_MODELS; do echo "$model $model $SORT_ARGS"; done)
  # and Memoria with its memory paths starting silent (the sorting stall of docs/results.md)
  SORT_RUNS+=$'\n'"memoria_gpt2_sort_zero_init memoria_gpt2_sort model.config.memoria_zero_init_memory_output=true $SORT_ARGS"
fi
part4() {
local train_s=$(($(left) - 100))  # the rest is start-up, the last validation and the test
if [ "$train_s" -ge 60 ]; then
  say "4. sorting runs for ${train_s} s"
  max_time=$(printf '00:00:%02d:%02d' $((train_s / 60)) $((train_s % 60)))
  mkdir -p /tmp/sort_runs
  names=()
  while read -r name model overrides; do
    [ -z "$name" ] && continue
    names+=("$name")
    echo "$name: model=$model $overrides" | tee -a "$LOG"
    # shellcheck disable=SC2086
    OMP_NUM_THREADS=2 timeout $(($(left) - 5)) $PY -m experiment.cli experiment=sort_quick model="$model" \
      $SORT_BASE $overrides \
      "+trainer.max_time=\"$max_time\"" trainer.enable_progress_bar=false logger=csv \
      hydra.run.dir="/tmp/sort_runs/$name" ${SORT_EXTRA:-} >"/tmp/sort_runs/$name.log" 2>&1 &
  done <<<"$SORT_RUNS"
  wait
  for name in "${names[@]}"; do
    echo "---- $name" >>"$OUT/sort_runs.txt"
    grep -E "^(\+|\|)|rror|Time limit" "/tmp/sort_runs/$name.log" | tail -20 >>"$OUT/sort_runs.txt"
    # the loss curve: step, train loss, grad norm, val accuracy (csv logger)
    metrics=$(find "/tmp/sort_runs/$name" -name metrics.csv | head -1)
    [ -n "$metrics" ] && $PY - "$metrics" >>"$OUT/sort_curves.txt" <<'PYEOF'
import csv, sys
rows = {}
for row in csv.DictReader(open(sys.argv[1])):
    entry = rows.setdefault(int(row["step"]), {})
    entry.update({k: v for k, v in row.items() if v})
print(sys.argv[1])
for step in sorted(rows):
    r = rows[step]
    print(step, *(f"{k}={float(r[k]):.4f}" for k in ("train/loss_step", "train/grad_norm", "val/acc-final") if k in r))
PYEOF
  done
  grep -E "^----|test/acc-final |optimizer steps|wall time|rror" "$OUT/sort_runs.txt" | tee -a "$LOG"
else
  say "4. skipped (too little time left)"
fi
}

# ---------------------------------------------------------------- run the parts asked for, in that order
for part in ${PARTS:-1 2 3}; do
  if declare -F "part$part" >/dev/null; then "part$part"; else say "no part $part (1-12, 14)"; fi
done
say "done"
# The device tool brings back at most 8 files: keep the log and the pytest output loose, pack the rest.
(cd "$OUT" && files=$(ls | grep -vE '^(gpu_checks.log|pytest_cuda.txt|details.tgz)$') && [ -n "$files" ] \
  && tar czf details.tgz $files && rm -f $files)
