#!/usr/bin/env bash
# Study v2 (docs/study.md): instruction following on FedIT's Dolly split, ranks 16,16,8,8,8,8,4,4,4,4, bfloat16
# compute over float32 masters (every row the same setting). Two stages, each a `bench ablate` grid run by
# STUDY_JOBS processes side by side (default: one per core, one torch thread each); the processes share the grid
# through its cell locks, so each cell runs once.
#   tune: FedIT (FedAvg-LoRA's server step with FedIT's recipe), FLoRA, FlexLoRA and centralized × lr
#         {2e-4, 5e-4, 1e-3} at seed 0 on `instruct-tune`, scored on the 200 validation instructions only, then
#         one lr beyond the grid's edge for each row whose best sat on it.
#   main: those rows at their tuned lr (local-only at FedIT's: its clients train as FedIT's do), the base model
#         (once: it trains nothing and scores the subsets every seed shares), seeds 0-4, scored on the 500 test
#         instructions (ROUGE-L) and the response-token loss. It starts only when every tuning cell has its record.
# Resumable: re-run the same command; finished cells are skipped, a killed cell resumes from its last round.
# Run it at a clean commit (records say git_dirty: false) and commit the records as cells complete:
#   nohup bash benchmarks/study_v2.sh > study_v2.log 2>&1 &
# STUDY_DRY_RUN=1 lists every cell as done or todo; STUDY_STAGES=tune (or main) runs one stage.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
export FEDLORA_EVAL_THREADS=${FEDLORA_EVAL_THREADS:-1}
jobs=${STUDY_JOBS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}   # nproc obeys OMP_NUM_THREADS
ranks=16,16,8,8,8,8,4,4,4,4
tune_dir=${STUDY_TUNE_RESULTS:-results/v2-tune} main_dir=${STUDY_RESULTS:-results/v2}
common=(--ranks-grid "$ranks" --set compute_dtype=bfloat16 ${STUDY_DRY_RUN:+--dry-run})
bench=(python -m bench.cli)    # this checkout's code, whatever `bench` on PATH points at

stage() {   # stage <name> <ablate args...>: STUDY_JOBS processes on one grid, then the grid's own check
  local name=$1; shift
  echo "[study_v2] stage $name: $jobs processes"
  local pids=()
  for ((j = 0; j < jobs; j++)); do
    "${bench[@]}" ablate "$@" & pids+=($!)
    sleep 5   # the first process claims its cell before the next one plans
  done
  local rc=0
  for p in "${pids[@]}"; do wait "$p" || rc=$?; done
  [[ $rc == 0 ]] || { echo "[study_v2] stage $name: a process ended with $rc; re-run to resume" >&2; exit "$rc"; }
  local todo
  todo=$("${bench[@]}" ablate "$@" --dry-run | grep -c " todo " || true)
  if [[ $todo != 0 ]]; then
    echo "[study_v2] stage $name: $todo cells to run" >&2
    [[ -n ${STUDY_DRY_RUN:-} ]] || exit 1
  else
    echo "[study_v2] stage $name complete"
  fi
}

stages=${STUDY_STAGES:-tune,main}
if [[ ,$stages, == *,tune,* ]]; then
  stage tune --preset instruct-tune --methods fedit,flora,flexlora --references centralized --lrs 2e-4,5e-4,1e-3 \
    --seeds 0 --results-dir "$tune_dir" --runs-dir runs/v2-tune "${common[@]}"
  # The first grid's best lr sat at its edge for these rows (FedIT and FlexLoRA at 1e-3, centralized at 2e-4):
  # one more lr beyond each edge, so no row's tuned lr is the boundary of what was tried.
  stage tune-edge --preset instruct-tune --methods fedit,flexlora --references "" --lrs 2e-3 \
    --seeds 0 --results-dir "$tune_dir" --runs-dir runs/v2-tune "${common[@]}"
  stage tune-edge --preset instruct-tune --methods "" --references centralized --lrs 1e-4 \
    --seeds 0 --results-dir "$tune_dir" --runs-dir runs/v2-tune "${common[@]}"
  # FedIT's best was again its edge (2e-3 over 1e-3, inside one cell's noise): one more step out
  stage tune-edge --preset instruct-tune --methods fedit --references "" --lrs 5e-3 \
    --seeds 0 --results-dir "$tune_dir" --runs-dir runs/v2-tune "${common[@]}"
  # and at 5e-3 once more (0.2414 against 0.2386 at 2e-3): one more step, so the pick is not the edge
  stage tune-edge --preset instruct-tune --methods fedit --references "" --lrs 1e-2 \
    --seeds 0 --results-dir "$tune_dir" --runs-dir runs/v2-tune "${common[@]}"
  # and at 1e-2 again (0.2479; held-out loss flat: 2.3294 -> 2.3278): the last step out, 2e-2 (it fell: 0.2283)
  stage tune-edge --preset instruct-tune --methods fedit --references "" --lrs 2e-2 \
    --seeds 0 --results-dir "$tune_dir" --runs-dir runs/v2-tune "${common[@]}"
fi
if [[ ,$stages, == *,main,* ]]; then
  stage main --preset instruct --methods fedit,flora,flexlora --references centralized,local-only \
    --tuned-lr "$tune_dir" --tuned-lr-as local-only=fedit --seeds 0,1,2,3,4 \
    --results-dir "$main_dir" --runs-dir runs/v2 "${common[@]}"
  stage base --preset instruct --methods "" --references base --seeds 0 --results-dir "$main_dir" \
    --runs-dir runs/v2 "${common[@]}"
fi
