#!/usr/bin/env bash
# A GPU machine's first three minutes: is the CUDA path sound here, and may a study train several
# units at once? Three checks, one line each (OK / NOT OK and why), then last the value to pass
# as --concurrent (auto when every check passed, else 1):
#   1. the CUDA tests (pytest -m gpu: graphs against eager steps, K units at once bit-identical
#      to each alone, a capture that draws dropout, a CPU checkpoint resumed on the GPU);
#   2. `pipeline.bench --concurrent 1,2,4,8` on the improved stage, its JSON kept;
#   3. a two-unit smoke study at --concurrent 2 on faces it generates (no data file needed).
# Run from the project root: `bash scripts/gpu_check.sh`. Uses $PYTHON, else .venv/bin/python,
# else python3; writes under $OUT (else a temporary folder): gpu_check.log, bench.json.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-$([ -x .venv/bin/python ] && echo "$PWD/.venv/bin/python" || command -v python3)}
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
log="$out/gpu_check.log"
: > "$log"
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >>"$log" 2>&1; then
  echo "gpu_check: no CUDA GPU here ($("$py" -c 'import torch; print("torch", torch.__version__)' 2>&1 | tail -1)); nothing to check"
  exit 2
fi
"$py" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda)"
ok=0
say() { echo "gpu_check: $*"; }

# 1. The CUDA tests.
t0=$(date +%s)
"$py" -m pytest -q -p no:cacheprovider -m gpu tests/test_engine.py tests/test_slots.py \
  > "$out/cuda_tests.log" 2>&1
rc=$?
cat "$out/cuda_tests.log" >> "$log"
# Every CUDA test must have run here: one skipped on a GPU is a check that did not happen.
if [ $rc -eq 0 ] && grep -qE '[0-9]+ passed' "$out/cuda_tests.log" \
    && ! grep -qE '[0-9]+ skipped' "$out/cuda_tests.log"; then
  say "OK cuda tests: $(grep -E '[0-9]+ passed' "$out/cuda_tests.log" | tail -1) ($(( $(date +%s) - t0 )) s)"
else
  say "NOT OK cuda tests (exit $rc): $(grep -E '^(FAILED|ERROR|SKIPPED)|[0-9]+ (passed|failed|skipped|error)' "$out/cuda_tests.log" | head -4 | tr '\n' ' ')(details: $out/cuda_tests.log)"
  ok=1
fi

# 2. Several units at once, as the study's start measures them.
t0=$(date +%s)
if "$py" -m pipeline.bench --stages improved --concurrent 1,2,4,8 --seconds 2 --model-uri '' \
    --json > "$out/bench.json" 2>>"$log" && "$py" - "$out/bench.json" <<'EOF' >>"$log" 2>&1
import json, sys
text = open(sys.argv[1]).read().strip().splitlines()[-1]
b = json.loads(text)
rates = {k: v.get("img_per_s") for k, v in b["concurrent"].items()}
assert rates.get("1") and rates.get("2"), f"no rate at K=1 and K=2: {rates}"
print("bench:", json.dumps(rates))
EOF
then
  say "OK bench --concurrent 1,2,4,8: $(grep '^bench:' "$log" | tail -1 | cut -c8-) img/s ($(( $(date +%s) - t0 )) s; $out/bench.json)"
else
  say "NOT OK bench --concurrent 1,2,4,8: $(tail -n 3 "$log" | tr '\n' ' ')"
  ok=1
fi

# 3. A two-unit study at two at once, on generated faces, in a folder of its own.
t0=$(date +%s)
work=$(mktemp -d)
if "$py" - "$work" <<'EOF' >>"$log" 2>&1
import sys
import numpy as np
import yaml
work = sys.argv[1]
rng = np.random.default_rng(0)
rows = ["emotion,pixels,Usage"]
for usage, n in (("Training", 60), ("PublicTest", 10)):
    for label in range(7):
        for _ in range(n):
            rows.append(f"{label},{' '.join(map(str, rng.integers(0, 256, 48 * 48)))},{usage}")
open(f"{work}/faces.csv", "w").write("\n".join(rows) + "\n")
study = {"reference": "basic", "base": "basic", "ladder": ["basic"], "seeds": 1,
         "reported": {"basic": 0.57},
         "toggles": {"batchnorm": {"with": {"batchnorm": True}, "without": {"batchnorm": False}}},
         "profiles": {"smoke": {"set": {"epochs": 2, "width": 0.25, "data_fraction": 1.0,
                                        "batch_size": 32, "early_stopping": 0},
                                "log_models": False}}}
open(f"{work}/study.yaml", "w").write(yaml.safe_dump(study))
EOF
then
  (cd "$work" && MLFLOW_TRACKING_URI="sqlite:///$work/mlflow.db" FER_CHECKPOINT_DIR="$work/ck" \
    "$py" -m pipeline.ablate --data faces.csv --study study.yaml --profile smoke \
    --storage "sqlite:///$work/ablate.db" --concurrent 2 --budget off) > "$work/study.log" 2>&1
  rc=$?
  cat "$work/study.log" >> "$log"
  if [ $rc -eq 0 ] && grep -q "2 at a time" "$work/study.log" \
      && grep -q "this worker trained 2 run(s)" "$work/study.log"; then
    say "OK study at --concurrent 2: 2 units trained side by side ($(( $(date +%s) - t0 )) s)"
  else
    say "NOT OK study at --concurrent 2 (exit $rc): $(grep -vE '^\s*$' "$work/study.log" | tail -n 2 | tr '\n' ' ')"
    ok=1
  fi
else
  say "NOT OK study at --concurrent 2: could not write its data ($(tail -n 1 "$log"))"
  ok=1
fi
[ $ok -eq 0 ] && echo auto || echo 1
