#!/usr/bin/env bash
# The GPU benchmarks in one go (at most 8 minutes of runs), for a machine that has torch, numpy and scipy
# but neither Ray nor MLflow nor msx installed. Run it from the repository root:
#
#   bash benchmarks/gpu.sh                     # results under $OUT, or ./benchmark-results when OUT is unset
#   bash benchmarks/gpu.sh --smoke             # tiny sizes on the CPU: checks this script end to end
#                                              # (MSX_BENCH_QUICK=1 does the same)
#
# Per paper backbone: the training step fp32 (the reference-style step), bf16 (msx's step) and bf16 compiled;
# all six strategies on a whole scan against the reference doing them in turn; one fold's validation the old
# way against the new.
#
# Where monai, nibabel or PyYAML (msx.models reads manifests) is missing, put their wheels (and einops) in
# ./.whl: they are installed into a temporary folder, nothing outside it is touched.
set -uo pipefail
[ "${1:-}" = "--smoke" ] && MSX_BENCH_QUICK=1

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
paper=(unet segresnet multiencoder swinunetr)
if [ -n "${MSX_BENCH_QUICK:-}" ]; then
    device=cpu
    train=(--backbones unet segresnet --width 0.125 --patch 32 --warmup 1 --steps 2)
    compiled=(--backbones unet --width 0.125 --patch 32 --warmup 1 --steps 1)
    inference=(--width 0.125 --shape 32 40 32 --roi 32 --steps 2)
    validation=(--scans 2 --steps 1 --shape 40 44 40 --repeats 1)
    limit=(600 600 900 600)
else
    device=cuda
    train=(--backbones "${paper[@]}")
    compiled=(--backbones "${paper[@]}")  # Inductor compiles each for about a minute: the last may not fit
    inference=()
    # The sampler uncompiled: its compilation would take most of this run's limit (training measures compile).
    validation=(--width 1.0 --roi 96 --shape 160 192 160 --scans 3 --repeats 1)
    limit=(80 140 140 120)  # 8 minutes at most
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
run "${limit[3]}" "validation, old against new" benchmarks/validation.py --device $device "${validation[@]}" \
    --json "$results/validation.json"
date -u
