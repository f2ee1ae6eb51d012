#!/usr/bin/env bash
# Every check that needs a GPU, in one command that fits one lent-device call, most important first. Each part is
# one function; PARTS picks them (names or numbers), in the order given:
#   1 tests    the CUDA tests (pytest -m cuda): no host sync in Memoria's step, CPU/GPU parity, graph replay equal to
#              eager, the walk kernel equal to the torch walk, every model on CUDA, the sorting and LM tasks;
#   2 memoria  scripts/bench_memoria.py on CUDA at the paper's three configurations (lm, enwik8, sort): ours on the
#              models' path replayed as CUDA graphs; ours with its defaults beside memoria-pytorch 1.1.0; LM compiled
#              + graphed with add and remind as one call (a fixed store: every new size compiles again);
#   3 step     scripts/bench_step.py at the WikiText-103 shape: eager (fp32 and bf16, fused Adam; the baseline),
#              then every block compiled and replayed as CUDA graphs (compile=true compile_mode=reduce-overhead;
#              fp32, two rounds, per phase, pipelined), printed against the eager plain step (target <= 1.3x);
#   4 sort     short sorting runs of the five models side by side (experiment=sort_quick: L 1000, segments of 256,
#              the paper's lr 2e-4 and fp32), plus Memoria GPT-2 with its memory output starting at zero, stopped
#              by Lightning's max_time when the budget runs out, then tested.
#
# The GPU image has torch, transformers and lightning but not hydra/omegaconf, so their wheels travel in .whl/
# together with transformers (the version tested here) and the reference package (scripts/gpu_wheels.sh downloads
# them). Through the device tool:
#   run(command="bash scripts/gpu_checks.sh", carry=[".whl"], timeout_s=600)
# Environment: BUDGET (seconds for everything, default 540), OUT (where logs and JSON go, default ./gpu_out),
# PARTS (default "tests memoria step sort"; sort gets what is left, and is skipped under 60 s), SORT_RUNS /
# SORT_MODELS / SORT_BASE / SORT_ARGS / SORT_EXTRA (the sorting runs, see part_sort), PYTHON (default python3).
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
setup() {
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
printf '#!/bin/sh\nPYTHONPATH=/tmp/refsite exec %s "$@"\n' "$(command -v "$PY")" >"$REF_PY"
chmod +x "$REF_PY"
{
  nvidia-smi -L 2>&1
  $PY -c "import torch, transformers, lightning; print('torch', torch.__version__, '| transformers',
transformers.__version__, '| lightning', lightning.__version__, '| cuda', torch.cuda.is_available())"
  $PY -c "import hydra, omegaconf; print('hydra', hydra.__version__, '| omegaconf', omegaconf.__version__)"
  git log -1 --format='commit %h %s' 2>/dev/null
} 2>&1 | tee -a "$LOG"
}

# ---------------------------------------------------------------- 1. CUDA tests
part_tests() {
say "1. pytest -m cuda"
# Only the files that hold CUDA tests: the others need packages (datasets, wandb) the GPU image lacks.
timeout "$(limit 240)" $PY -m pytest -q -m cuda -p no:cacheprovider -o addopts="" \
  tests/memoria/test_memoria.py tests/memoria/test_graphs.py tests/memoria/test_kernels.py tests/experiment/models \
  tests/experiment/tasks/test_sorting.py tests/experiment/tasks/test_language_modeling.py \
  2>&1 | tee "$OUT/pytest_cuda.txt" | tail -15 | tee -a "$LOG"
}

# ---------------------------------------------------------------- 2. the memory step alone, against the reference
# name | configs | implementations | options. The LM store is capped at 1,024 LTMs for the compiled run so that one
# size compiles once (about 860 engrams a row at this config: the cap is never reached).
part_memoria() {
say "2. bench_memoria (cuda)"
while IFS='|' read -r name configs impls variant; do
  # shellcheck disable=SC2086
  timeout "$(limit 200)" $PY scripts/bench_memoria.py --device cuda --configs $configs \
    --impl $impls $variant --warmup 40 --steps 30 --reference-python "$REF_PY" --timeout 150 \
    --json "$OUT/$name.json" 2>&1 | tail -8 | tee -a "$LOG"
done <<'VARIANTS'
bench_memoria_graphed|lm enwik8 sort|ours|--static-shape --no-validate --cuda-graph
bench_memoria|lm enwik8 sort|ours reference|
bench_memoria_compiled|lm|ours|--static-shape --no-validate --cuda-graph --compile --add-and-remind --ltm-capacity 1024
VARIANTS
}

# ---------------------------------------------------------------- 3. one training step at the WikiText-103 shape
part_step() {
say "3. bench_step eager (fp32, bf16; fused Adam): the baseline"
timeout "$(limit 150)" $PY scripts/bench_step.py --warmup 20 --steps 30 --pipelined \
  --json "$OUT/bench_step_eager.json" 2>&1 | grep -v Warning | tail -16 | tee -a "$LOG"
say "3. bench_step fp32, every block compiled as CUDA graphs (compile=true compile_mode=reduce-overhead)"
local baseline=()  # the eager run's rows, if it finished in its time
[ -s "$OUT/bench_step_eager.json" ] && baseline=(--baseline "$OUT/bench_step_eager.json")
timeout "$(limit 240)" $PY scripts/bench_step.py --warmup 20 --steps 30 --rounds 2 --compile-blocks \
  --compile-mode reduce-overhead --precisions fp32 --phases --pipelined "${baseline[@]}" \
  --json "$OUT/bench_step_compiled.json" 2>&1 | grep -v Warning | tail -20 | tee -a "$LOG"
}

# ---------------------------------------------------------------- 4. sorting, every model, side by side
# SORT_RUNS: one run per line, "<name> <model> [more overrides]"; default: the five *_sort models with SORT_ARGS,
# plus Memoria with memoria_zero_init_memory_output=true (the sorting stall of docs/results.md).
# SORT_BASE goes to every run; SORT_ARGS to each default run (the paper's lr 2e-4 and fp32 come from the preset).
SORT_BASE=${SORT_BASE:-task.data.num_train=6400 trainer.max_epochs=2 trainer.log_every_n_steps=10}
SORT_ARGS=${SORT_ARGS:-}
SORT_MODELS=${SORT_MODELS:-memoria_gpt2_sort gpt2_sort transformer_xl_sort compressive_sort infinity_former_sort}
if [ -z "${SORT_RUNS:-}" ]; then
  SORT_RUNS=$(for model in $SORT_MODELS; do echo "$model $model $SORT_ARGS"; done)
  SORT_RUNS+=$'\n'"memoria_gpt2_sort_zero_init memoria_gpt2_sort model.config.memoria_zero_init_memory_output=true $SORT_ARGS"
fi
part_sort() {
local train_s=$(($(left) - 100))  # the rest is start-up, the last validation and the test
if [ "$train_s" -lt 60 ]; then
  say "4. sorting skipped (too little time left)"
  return 0
fi
say "4. sorting runs for ${train_s} s"
local max_time names=() name model overrides metrics
max_time=$(printf '00:00:%02d:%02d' $((train_s / 60)) $((train_s % 60)))
mkdir -p /tmp/sort_runs
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
}

# ---------------------------------------------------------------- run the parts asked for, in that order
parts=()
for part in ${PARTS:-tests memoria step sort}; do
  case "$part" in
    1|tests) parts+=(part_tests) ;;
    2|memoria) parts+=(part_memoria) ;;
    3|step) parts+=(part_step) ;;
    4|sort) parts+=(part_sort) ;;
    *) echo "gpu_checks.sh: no part '$part' in PARTS; use tests memoria step sort (or 1-4)" >&2; exit 2 ;;
  esac
done
setup
for fn in "${parts[@]}"; do "$fn"; done
say "done"
# The device tool brings back at most 8 files: keep the log and the pytest output loose, pack the rest.
(cd "$OUT" && files=$(ls | grep -vE '^(gpu_checks.log|pytest_cuda.txt|details.tgz)$') && [ -n "$files" ] \
  && tar czf details.tgz $files && rm -f $files)
