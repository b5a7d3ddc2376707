#!/usr/bin/env bash
# Screenshots of a finished study in the MLflow UI, as a user sees them: the parent run's page
# (the answer first) and the study's view (a row per cell). Needs chromium
# (`apt-get install -y chromium`) and the project's venv.
#   bash scripts/screenshots.sh sqlite:///mlflow.db OUT_DIR [STUDY_NAME]
set -euo pipefail
store=${1:?usage: screenshots.sh STORE OUT_DIR [STUDY_NAME]}
out=${2:?usage: screenshots.sh STORE OUT_DIR [STUDY_NAME]}
study=${3:-}
here=$(cd "$(dirname "$0")/.." && pwd)
py="$here/.venv/bin/python"
mkdir -p "$out"
port=5077
"$here/.venv/bin/mlflow" ui --backend-store-uri "$store" --host 127.0.0.1 --port $port \
    > "$out/mlflow-ui.log" 2>&1 &
ui=$!
trap 'kill $ui 2>/dev/null || true' EXIT
for _ in $(seq 60); do
    curl -sf "http://127.0.0.1:$port/health" > /dev/null && break
    sleep 1
done
# The parent run of the study (the latest when none is named) and the view it stored.
read -r exp parent name < <(MLFLOW_TRACKING_URI="$store" STUDY="$study" "$py" - <<'PY'
import os, mlflow
f = "tags.role = 'study'" + (f" and tags.study = '{os.environ['STUDY']}'" if os.environ["STUDY"] else "")
r = mlflow.search_runs(search_all_experiments=True, filter_string=f, output_format="list",
                       order_by=["attributes.start_time DESC"], max_results=1)[0]
print(r.info.experiment_id, r.info.run_id, r.data.tags["study"])
PY
)
base="http://127.0.0.1:$port/#/experiments/$exp"
shot() {  # NAME SIZE URL UNTIL [CLICK...]: "Close" shuts MLflow's assistant panel
    local name=$1 size=$2 url=$3 until=$4
    shift 4
    local clicks=()
    for c in "$@"; do clicks+=(--click "$c"); done
    "$py" "$here/scripts/screenshot.py" "$url" "$out/$name" --size "$size" --until "$until" \
        --click Close "${clicks[@]}"
}
ml="workflowType=machine_learning"
# The parent run as it opens (MLflow shows 100 pixels of a description), then after "Show more".
shot mlflow_ui_parent.png 1600,900 "$base/runs/$parent?$ml" "Description"
shot mlflow_ui_parent_expanded.png 1600,1500 "$base/runs/$parent?$ml" "Description" "Show more"
shot mlflow_ui_cells.png 1600,1000 "$base/runs?$ml&viewStateShareKey=$name" "Group:"
