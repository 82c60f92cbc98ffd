#!/usr/bin/env bash
# The GPU session of issue 13, in one script that fits the device machine's 10-minute command limit:
#   1. the CUDA tests (`pytest -m gpu` and every test named *cuda*),
#   2. the HMC benchmarks with --device cuda (2-D targets, refined-guide overhead) and the one-GPU compute time of
#      benchmarks/scaling.py (what the 8-GPU projection needs),
#   3. `ppl-vae run` of the best HMC model available (hh-vaem if registered, else hmc-vaem) on boston, --device cuda,
#   4. the UCI table's HMC rows on one GPU (the (model, data set) jobs run concurrently on the same GPU; small models
#      are bound by kernel launches, so one GPU serves several processes at once).
# Usage, from the repository root (no network needed; nothing is installed):
#   bash benchmarks/run_on_gpu.sh "$OUT"            # outputs under $OUT (default: $OUT or /tmp/ppl_vae_gpu)
# Environment knobs: UCI_STEPS (3000), UCI_SPLITS (3), UCI_DATASETS, RUN_STEPS (3000), JOB_TIMEOUT (330 s per UCI job).
set -u
cd "$(dirname "$0")/.." || exit 1
OUT=${1:-${OUT:-/tmp/ppl_vae_gpu}}; L="$OUT/logs"; mkdir -p "$L"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg OMP_NUM_THREADS=1
PY=${PYTHON:-python3}
UCI_STEPS=${UCI_STEPS:-3000}; UCI_SPLITS=${UCI_SPLITS:-3}; RUN_STEPS=${RUN_STEPS:-3000}; JOB_TIMEOUT=${JOB_TIMEOUT:-330}
UCI_DATASETS=${UCI_DATASETS:-"boston yacht energy concrete diabetes wine"}
SUMMARY="$OUT/summary.md"
say() { echo "$*" | tee -a "$SUMMARY"; }

# ---------------------------------------------------------------- 0. environment (no pip: check what is there)
if ! $PY -c "import torch" 2>/dev/null; then
  echo "run_on_gpu.sh: torch is not importable with $PY; nothing to run" | tee "$SUMMARY"; exit 3
fi
missing=$($PY - <<'EOF'
import importlib
need = ["pyro", "numpy", "scipy", "xarray", "tqdm", "pandas", "arviz", "sklearn", "matplotlib"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
EOF
)
if ! $PY -c "import pyro" 2>/dev/null; then
  echo "run_on_gpu.sh: pyro-ppl is not installed on this machine (missing: $missing). ppl_vae needs it and this" \
       "machine has no network: install it beforehand (e.g. copy a pyro-ppl wheel and run" \
       "'pip install --no-index --no-deps pyro_ppl-*.whl opt_einsum-*.whl'), then re-run." | tee "$SUMMARY"
  exit 3
fi
[ -n "$missing" ] && echo "run_on_gpu.sh: warning: not installed: $missing (steps that need them will fail)"
{ echo "# GPU session ($(date -u +%Y-%m-%dT%H:%MZ))"; echo; echo '```'; nvidia-smi -L 2>&1
  $PY -c "import torch, pyro; print('torch', torch.__version__, '| pyro', pyro.__version__, '| cuda', torch.version.cuda,
'| device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE')"; echo '```'; } \
  | tee "$SUMMARY"
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "torch.cuda.is_available() is False: not a CUDA machine, stopping"; exit 4
fi
step() {  # step NAME TIMEOUT CMD...: run, log to $L/NAME.log, record status and wall time
  local name=$1 limit=$2; shift 2; local t0=$SECONDS
  timeout "$limit" "$@" > "$L/$name.log" 2>&1; local rc=$?
  say "- $name: exit $rc, $((SECONDS - t0)) s ($L/$name.log)"; return $rc
}

# ---------------------------------------------------------------- 1. CUDA tests
say ""; say "## CUDA tests"
if $PY -c "import pytest" 2>/dev/null; then
  PT=("$PY" -m pytest -q -p no:cacheprovider -p no:nbmake -o addopts="" -rs)
  step pytest_gpu_marker 150 "${PT[@]}" -m gpu tests
  step pytest_cuda_named 150 "${PT[@]}" -k "cuda or gpu" tests
  grep -hE "passed|failed|error|skipped" "$L"/pytest_gpu_marker.log "$L"/pytest_cuda_named.log | tail -4 | tee -a "$SUMMARY"
else
  say "- pytest is not installed: CUDA tests not run"
fi

# ---------------------------------------------------------------- 2. HMC benchmarks and one-GPU step time
say ""; say "## HMC benchmarks (--device cuda) and the one-GPU step time of the scaling benchmark"
step hmc_2d_cuda 150 "$PY" benchmarks/hmc_2d.py --device cuda --no-nuts --out "$OUT/hmc_2d_cuda.md"
step overhead_cuda 90 "$PY" benchmarks/refined_guide_overhead.py --device cuda
tail -6 "$L/overhead_cuda.log" | tee -a "$SUMMARY"
step scaling_cuda 120 "$PY" benchmarks/scaling.py --device cuda --processes 1 --steps 200 --out "$OUT/scaling_cuda.md"
grep -E "^\| (vae|hmc-vae) " "$OUT/scaling_cuda.md" 2>/dev/null | tee -a "$SUMMARY"

# ---------------------------------------------------------------- 3 + 4. CLI run and the UCI table, concurrently
MODEL=$($PY -c "from ppl_vae.models import MODELS; print('hh-vaem' if 'hh-vaem' in MODELS else 'hmc-vaem')")
say ""; say "## ppl-vae run $MODEL --dataset boston --device cuda, and the UCI HMC rows on one GPU"
( step "cli_${MODEL}_boston" $((JOB_TIMEOUT + 30)) "$PY" -m ppl_vae.cli run "$MODEL" --dataset boston --splits 1 \
    --steps "$RUN_STEPS" --device cuda --out "$OUT/cli_${MODEL}_boston" --overwrite ) &
UCI_MODELS="hmc-vae hmc-vaem"; [ "$MODEL" = "hh-vaem" ] && UCI_MODELS="$UCI_MODELS hh-vaem"
for d in $UCI_DATASETS; do for m in $UCI_MODELS; do
  ( step "uci_${m}_${d}" "$JOB_TIMEOUT" "$PY" benchmarks/uci_table.py --models "$m" --datasets "$d" \
      --splits "$UCI_SPLITS" --steps "$UCI_STEPS" --device cuda --out "$OUT/uci-$m-$d" ) &
done; done
wait
tail -8 "$L/cli_${MODEL}_boston.log" | tee -a "$SUMMARY"
say ""; say "UCI rows ($UCI_SPLITS splits, $UCI_STEPS steps, one GPU, jobs concurrent):"
cat "$OUT"/uci-*/uci_table.md 2>/dev/null | grep -E "^\| [a-z-]+ \| (hmc|hh)" | sort -u | tee -a "$SUMMARY"
tar czf "$OUT/gpu_results.tgz" -C "$OUT" logs summary.md $(cd "$OUT" && ls -d *.md cli_* uci-* 2>/dev/null) 2>/dev/null
say ""; say "outputs: $OUT (summary.md, logs/, gpu_results.tgz)"

# ---- Issue 10: the full HH-VAEM reproduction (all ten table models x nine UCI sets x 10 folds, both protocols, the
# paper's ~20k steps) and the MNIST table. The table networks are tiny, so the UCI cells run one per CPU core (1
# thread each) and only the MNIST conv nets use the GPU. Results: $L/uci10/uci_table_<protocol>_<data>_<model>.{md,nc,png}
# and $L/mnist/mnist_table.{md,nc,png}. 180 single-model cells of 10 folds x 20k steps: hours even on 16 cores;
# cut --splits/--steps for a session of minutes.
NPROC=$(nproc)
python3 benchmarks/mnist_table.py --splits 3 --steps 20000 --num-samples 1000 --device cuda --out "$L/mnist" \
  > "$L/mnist.log" 2>&1 &
for p in paper default; do for d in boston concrete energy yacht diabetes wine naval avocado insurance; do
  for m in vaem miwaem h-vaem hmc-vaem hh-vaem vae miwae h-vae hmc-vae hh-vae; do
    while [ "$(jobs -rp | wc -l)" -ge "$NPROC" ]; do sleep 5; done
    OMP_NUM_THREADS=1 python3 benchmarks/uci_table.py --protocol $p --datasets $d --models $m --splits 10 \
      --steps 20000 --out "$L/uci10" --name "uci_table_${p}_${d}_${m}" > "$L/uci10-$p-$d-$m.log" 2>&1 &
  done
done; done
wait
cat "$L"/uci10/uci_table_*.md "$L"/mnist/mnist_table.md 2>/dev/null; tar czf "$OUT/gpu_results_issue10.tgz" -C "$OUT" logs
