#!/usr/bin/env bash
# The GPU benchmarks in one go (at most 9 minutes of runs), for a machine that has torch, numpy and scipy
# but neither Ray nor MLflow nor msx installed. Run it from the repository root:
#
#   bash benchmarks/gpu.sh                     # results under $OUT, or ./benchmark-results when OUT is unset
#   MSX_BENCH_QUICK=1 bash benchmarks/gpu.sh   # tiny sizes on the CPU: checks this script end to end
#
# Where monai, nibabel or PyYAML (msx.models reads manifests) is missing, put their wheels (and einops) in
# ./.whl: they are installed into a temporary folder, nothing outside it is touched.
set -uo pipefail

repo=$(pwd)
results=${OUT:-$repo/benchmark-results}
python=${PYTHON:-python3}
mkdir -p "$results"
exec > >(tee "$results/gpu.log") 2>&1

# pyproject.toml maps the package msx.models to the folder models/; a folder holding msx/models -> models/ on
# PYTHONPATH gives the same import without installing msx (msx itself is a namespace package: no __init__.py).
shim=$(mktemp -d)
trap 'rm -rf "$shim"' EXIT
mkdir "$shim/msx"
ln -s "$repo/models" "$shim/msx/models"
search_path=$shim
if ! "$python" -c 'import monai, nibabel, yaml' 2>/dev/null; then
    if ! compgen -G ".whl/*.whl" >/dev/null; then
        echo "monai, nibabel or yaml is missing and there are no wheels in ./.whl" >&2
        exit 1
    fi
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$shim/site" .whl/*.whl || exit 1
    search_path=$search_path:$shim/site
fi
export PYTHONPATH=$search_path${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

# "unet" is the paper's MSSegDiff U-Net (85.7 M parameters at width 1.0, the reference's network): its
# reference-style fp32 step at 96^3, batch 2 is the figure to set beside the reference code's own, 0.152-0.157 s
# per step on an H200 (docs/BENCHMARKS.md). "basic-unet" is the lighter MONAI BasicUNet, for scale.
if [ -n "${MSX_BENCH_QUICK:-}" ]; then
    device=cpu
    train=(--backbones unet basic-unet segresnet --width 0.125 --patch 32 --warmup 1 --steps 2)
    compiled=(--backbones unet --width 0.125 --patch 32 --warmup 1 --steps 1)
    inference=(--width 0.125 --shape 32 40 32 --roi 32 --steps 2)
    limit=(600 600 900)
else
    device=cuda
    train=(--backbones unet multiencoder basic-unet segresnet swinunetr attention-unet unetr)
    compiled=(--backbones unet segresnet)
    inference=()
    limit=(150 240 150)
fi

date -u
nvidia-smi || echo "(no nvidia-smi)"
"$python" -c 'import sys, torch, monai, msx.models
print("python", sys.version.split()[0], "torch", torch.__version__, "monai", monai.__version__,
      "cuda", torch.cuda.is_available(), "msx.models from", msx.models.__path__[0])' || exit 1

# Each run writes its JSON as it goes; one that fails or runs out of time does not stop the others.
run() {
    local seconds=$1 name=$2
    shift 2
    echo
    echo "== $name"
    timeout "$seconds" "$python" "$@" || echo "== $name: failed or stopped after $seconds s (exit $?)"
}
run "${limit[0]}" "training step, eager" benchmarks/train_step.py --device $device "${train[@]}" \
    --json "$results/train_step_eager.json"
run "${limit[1]}" "all-strategy inference" benchmarks/inference.py --device $device "${inference[@]}" \
    --json "$results/inference.json"
run "${limit[2]}" "training step, torch.compile" benchmarks/train_step.py --device $device --compile "${compiled[@]}" \
    --json "$results/train_step_compiled.json"
date -u
