#!/usr/bin/env bash
# Study v1 (docs/study.md): three `bench ablate` grids on the `study` preset, split into one job per
# (grid, seed), run STUDY_JOBS at a time (default: one per core), each on ONE torch thread: on this 2-core CPU a
# FedIT cell took 132 CPU s on one thread and 204 CPU s in the same wall time on two (docs/study.md), so two
# one-thread jobs side by side finish about twice the cells an hour.
# Jobs start in the order the report needs them: the main table's seeds first, then the sweeps seed by seed.
# Resumable: re-run the same command and finished cells are skipped, a killed cell resumes from its last round.
# Run it at a clean commit (records say git_dirty: false) and commit its records (results/v1-commonsense/, the v1
# study: results/v1-commonsense/README.md) as cells complete:
#   nohup bash benchmarks/study.sh > study.log 2>&1 &
# STUDY_DRY_RUN=1 lists every cell as done or todo without running any.
set -euo pipefail
cd "$(dirname "$0")/.."
export STUDY_RESULTS=${STUDY_RESULTS:-results/v1-commonsense} STUDY_RUNS=${STUDY_RUNS:-runs/study}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
export FEDLORA_EVAL_THREADS=${FEDLORA_EVAL_THREADS:-1}
seeds=${STUDY_SEEDS:-0,1,2}
jobs=${STUDY_JOBS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}   # nproc obeys OMP_NUM_THREADS

if [[ ${1:-} == --job ]]; then   # one (grid, seed) job: the same cells whichever job order or parallelism runs them
  part=$2 seed=$3
  # keep_global_model=false: each cell keeps its checkpoint (MBs), not a 0.5 GB model (156 cells: 80 GB); `bench eval
  # --run` writes a cell's model again from the checkpoint when it is scored later
  common=(--preset study --results-dir "$STUDY_RESULTS" --runs-dir "$STUDY_RUNS" --seeds "$seed"
          --set keep_global_model=false ${STUDY_DRY_RUN:+--dry-run})
  bench=(python -m bench.cli)    # this checkout's code, whatever `bench` on PATH points at
  case $part in
    # 1. main table: every registered method and the three reference rows, homogeneous vs heterogeneous ranks
    main) exec "${bench[@]}" ablate "${common[@]}" --ranks-grid "homo;16,8,4,4" --references base,centralized,local-only ;;
    # 2. rank-distribution sweep (predefined task clients): FedIT, FLoRA, FlexLoRA
    rank) exec "${bench[@]}" ablate "${common[@]}" --methods fedit,flora,flexlora \
            --ranks-grid "uniform;heavy-tail-light;heavy-tail-strong" ;;
    # 3. data-heterogeneity sweep at ranks 16,8,4,4: IID, Dirichlet 1 and 0.1 over the task label
    data) exec "${bench[@]}" ablate "${common[@]}" --methods fedit,flora,flexlora --ranks-grid "16,8,4,4" \
            --partitions "iid;dirichlet:1;dirichlet:0.1" --references centralized,local-only ;;
    *) echo "study.sh: unknown grid $part (main, rank, data)" >&2; exit 2 ;;
  esac
fi

IFS=, read -ra seed_list <<< "$seeds"
queue=()
for s in "${seed_list[@]}"; do queue+=("main $s"); done
for s in "${seed_list[@]}"; do queue+=("rank $s" "data $s"); done
printf '%s\n' "${queue[@]}" | xargs -P "$jobs" -L 1 bash "$0" --job
