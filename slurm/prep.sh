#!/usr/bin/env bash
# Submit the whole curation as three dependent SLURM jobs: download -> embed array -> merge.
#   bash slurm/prep.sh /data/laion.parquet /data/curated 32 [--config prep.yaml] [--set k=v ...]
# The options after TASKS go to every stage. Resubmitting after a failure resumes every stage.
set -euo pipefail
URLS=${1:?usage: bash slurm/prep.sh URLS OUT TASKS [prep options]}
OUT=${2:?usage: bash slurm/prep.sh URLS OUT TASKS [prep options]}
TASKS=${3:?usage: bash slurm/prep.sh URLS OUT TASKS [prep options]}
shift 3
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p logs
download=$(sbatch --parsable "$HERE/prep_download.sbatch" "$URLS" "$OUT" "$@")
embed=$(sbatch --parsable --dependency=afterok:"$download" --array=0-$((TASKS - 1)) "$HERE/prep_embed.sbatch" "$OUT" "$@")
merge=$(sbatch --parsable --dependency=afterok:"$embed" "$HERE/prep_merge.sbatch" "$OUT" "$@")
echo "submitted download $download -> embed array $embed (${TASKS} tasks) -> merge $merge"
