#!/usr/bin/env bash
# The study of issue #17 (docs/study.md): three `bench ablate` grids on the `study` preset, in order of what the
# report needs first. Resumable: re-run the same command and finished cells are skipped, a killed cell resumes from
# its last round. Run it at a clean commit (records say git_dirty: false) and commit results/ as cells complete:
#   nohup bash benchmarks/study.sh > study.log 2>&1 &
set -euo pipefail
cd "$(dirname "$0")/.."
out=${STUDY_RESULTS:-results}
runs=${STUDY_RUNS:-runs/study}
bench=(python -m bench.cli)   # this checkout's code, whatever `bench` on PATH points at
common=(--preset study --results-dir "$out" --runs-dir "$runs" --seeds "${STUDY_SEEDS:-0,1,2}")
# 1. main table: every registered method and the three reference rows, homogeneous vs heterogeneous ranks
"${bench[@]}" ablate "${common[@]}" --ranks-grid "homo;16,8,4,4" --references base,centralized,local-only
# 2. rank-distribution sweep (predefined task clients): FedIT, FLoRA, FlexLoRA
"${bench[@]}" ablate "${common[@]}" --methods fedit,flora,flexlora --ranks-grid "uniform;heavy-tail-light;heavy-tail-strong"
# 3. data-heterogeneity sweep at ranks 16,8,4,4: IID, Dirichlet 1 and 0.1 over the task label
"${bench[@]}" ablate "${common[@]}" --methods fedit,flora,flexlora --ranks-grid "16,8,4,4" \
  --partitions "iid;dirichlet:1;dirichlet:0.1" --references centralized,local-only
