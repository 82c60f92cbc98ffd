#!/usr/bin/env bash
# The GPU session of the closing note: CUDA tests, the HMC benchmarks on the GPU, a `--device cuda` CLI run, and
# (on that machine's many CPU cores, one thread each) the HMC rows of the UCI table. Expects torch with CUDA already
# installed and ppl_vae's pure-Python dependencies as wheels in .whl/ (see the device notes in the closing note).
set -u
OUT=${OUT:-/tmp/ppl_vae_gpu}; L=$OUT/logs; mkdir -p "$L"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg PPL_VAE_SMOKE=1
nvidia-smi -L; python3 -c "import torch, pyro; print(torch.__version__, pyro.__version__, torch.cuda.get_device_name())"
for d in boston yacht energy concrete diabetes wine-quality-red; do for m in hmc-vae hmc-vaem; do
  OMP_NUM_THREADS=1 timeout 530 python3 benchmarks/uci_table.py --models $m --datasets $d --splits 3 --steps 3000 \
    --out "$L/uci-$m-$d" > "$L/uci-$m-$d.log" 2>&1 &
done; done
python3 -m pytest -q -p no:cacheprovider -p no:nbmake -o addopts="" tests/test_models.py tests/test_ugvae.py \
  tests/test_hmc.py tests/test_refined_guide.py tests/test_sksd.py tests/test_likelihoods.py > "$L/pytest_gpu.log" 2>&1
tail -3 "$L/pytest_gpu.log"
python3 benchmarks/hmc_2d.py --device cuda --no-nuts --out "$L/hmc_2d_cuda.md" > "$L/hmc_2d_cuda.log" 2>&1
python3 benchmarks/refined_guide_overhead.py --device cuda > "$L/overhead_cuda.log" 2>&1
tail -5 "$L/overhead_cuda.log"
( time python3 -m ppl_vae.cli run vaem --dataset boston --splits 1 --steps 1500 --device cuda --no-progress \
    --out "$L/cli_cuda" ) > "$L/cli_cuda.log" 2>&1
tail -6 "$L/cli_cuda.log"
wait
cat "$L"/uci-*/uci_table.md 2>/dev/null | grep "| hmc" ; tar czf "$OUT/gpu_results.tgz" -C "$OUT" logs
