#!/usr/bin/env bash
# The GPU figures of the README's performance table, on the lent GPU machine (the `device` tool),
# from the repository root, once the staged parts are in /tmp/asm (../shared/tools/device-stage.sh):
#
#   bash benchmarks/gpu/figures.sh sync_colocated grpo_1gpu     # any of the steps below, in order
#   bash benchmarks/gpu/figures.sh dift:ga4:--grad-accum,4 grpo_1gpu:mb8:micro_batch_size=8   # tag, args
#
# Each step writes its JSON to $OUT (default /tmp/out). The machine keeps /tmp only while warm, so
# the set-up (unpack, build the 3B-shape model) re-runs when it finds nothing.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" /tmp/site
if [ ! -d /tmp/site/vllm ]; then
  cat /tmp/asm/part* | xz -d -T16 | tar -x -C /tmp/site || exit 1
fi
source benchmarks/gpu/env.sh
# FlashInfer's sampler JIT-compiles for minutes on a fresh machine; the PyTorch sampler needs none.
export VLLM_USE_FLASHINFER_SAMPLER=0 PYTHONUNBUFFERED=1
GPU=$(python -c "import torch; print(torch.cuda.get_device_name().split()[1])")  # H100 / H200

step() {  # every step but preprocess and tests_gpu runs the 3B-shape model, built once per machine
  echo "== $1 ($(date +%T))"
  case $1 in preprocess|tests_gpu) return ;; esac
  [ -f /tmp/qwen3b/config.json ] || python -m fourdthinker tiny-model --shape 3b --out /tmp/qwen3b
}

# The image has no pytest: carry it (git-ignored `.device/pyt/`, 7.5 MB), once, here:
#   S=.venv/lib/python3.11/site-packages; mkdir -p .device/pyt && cp -r $S/{_pytest,pytest,pluggy,iniconfig,\
#     pygments,packaging,pytest_timeout.py} $S/{pytest,pytest_timeout,pluggy,iniconfig}-*.dist-info .device/pyt/
tests_gpu() {  # the vLLM tests on a GPU, where the plugin runs on vLLM's V2 runner (CI has no GPU)
  step tests_gpu
  PYTHONPATH=$PYTHONPATH:$PWD/.device/pyt python -m pytest -q -x -p no:cacheprovider -o addopts="" \
    tests/test_latent_runner_v2.py tests/test_vllm_plugin.py "$@" 2>&1 | tail -60
}

sync_colocated() {  # issue 9: learner and engine on one GPU, weights over CUDA IPC; tag "layerwise":
  local tag=${1:-in_place}  # the receivers take vLLM's layerwise reload even where in-place loading works
  step "sync_colocated $tag"
  (cd benchmarks && FOURDTHINKER_LAYERWISE_RELOAD=$([ "$tag" = layerwise ] && echo 1 || echo 0) \
     python weight_sync.py --model /tmp/qwen3b --colocate --gpu-memory-utilization 0.25 \
     --out "$OUT/weight_sync-$GPU-3b-cuda_ipc-$tag.json")
}

sync_2gpu() {  # issue 10: learner on GPU 0, engine on GPU 1, weights over NCCL. Tags: in_place (recorded
  local tag=${1:-in_place}  # copies replayed), loaders (in place, loaders every sync), layerwise
  step "sync_2gpu $tag"
  (cd benchmarks && FOURDTHINKER_LAYERWISE_RELOAD=$([ "$tag" = layerwise ] && echo 1 || echo 0) \
     FOURDTHINKER_WEIGHT_REPLAY=$([ "$tag" = in_place ] && echo 1 || echo 0) \
     python weight_sync.py --model /tmp/qwen3b --repeats 5 \
     --out "$OUT/weight_sync-$GPU-3b-nccl-2gpu-$tag.json")
}

grpo_2gpu() {  # issue 10: the pipeline with the engine on one GPU and the learner on the other
  local tag=${1:-base}; shift || true
  step "grpo_2gpu $tag"
  (cd benchmarks && python grpo_step.py --config ../configs/3b/grpo_2gpu.yaml --steps 3 model_dir=/tmp/qwen3b \
     "$@" --out "$OUT/grpo_step-$GPU-3b-2gpu-$tag.json")
}

rollout_profile() {  # issue 4: torch profiles of a short plugin run and a plain one, one archive
  step rollout_profile
  (cd benchmarks && python rollout.py --model /tmp/qwen3b --prompts 64 --prompt-tokens 256 --new-tokens 512 \
     --engines plugin,plain --profile-dir /tmp/profile --profile-tokens 64 --out "$OUT/rollout-$GPU-3b-profiled.json")
  tar -czf "$OUT/rollout-profile.tgz" -C /tmp profile
}

grpo_1gpu() {  # issue 9: the colocated pipeline (engine sleeps while the learner trains); extra: overrides
  local tag=${1:-base}; shift || true
  step "grpo_1gpu $tag"
  (cd benchmarks && python grpo_step.py --config ../configs/3b/grpo_1gpu.yaml --steps 3 model_dir=/tmp/qwen3b \
     "$@" --out "$OUT/grpo_step-$GPU-3b-1gpu-$tag.json")
}

rollout() {  # issue 4: HF reference vs plugin vs plain vLLM; extra: e.g. --engines,plugin,plain,plain_v1
  local tag=${1:-all}; shift || true
  step "rollout $tag"
  (cd benchmarks && python rollout.py --model /tmp/qwen3b --prompts 64 --prompt-tokens 256 --new-tokens 512 \
     --repeats 3 "$@" --out "$OUT/rollout-$GPU-3b-$tag.json")
}

# The sam3 backend needs wheels the GPU image lacks. Here, once (git-ignored `.whl/`, 39 MB):
#   echo /.whl/ >> .git/info/exclude; for w in sam3==0.1.4 timm==1.0.31 ftfy==6.3.1 wcwidth==0.9.4 \
#     portalocker==4.4.2 einops==0.8.2 pycocotools==2.0.11 av==18.1.0; do python3 -m pip download --no-deps \
#     --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$w"; done
#   python3 -m pip wheel --no-deps -w .whl iopath==0.1.10        # sdist only
# then, on the machine (carry [".whl"]), before this script:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
preprocess() {  # issue 8: the Ray Data plan vs a bare loop with the sam3 backend (random weights)
  step preprocess
  (cd benchmarks && python preprocess.py --videos "${1:-8}" --out "$OUT/preprocess-$GPU-sam3.json" \
     segmenter.backend=sam3 segmenter.num_gpus_per_actor=1 segmenter.max_actors=1 'concepts=[red box, blue sphere]')
}

dift() {  # issue 3: one DIFT step at the 3B shape; extra arguments pass through
  local tag=$1; shift
  step "dift $tag"
  (cd benchmarks && python dift_step.py --model /tmp/qwen3b --frames 16 --frame-size 448 --text-words 1500 \
     --steps 3 "$@" --out "$OUT/dift_step-$GPU-3b-$tag.json")
}

serving() {  # issue 20: the Serve app over HTTP vs its engine in-process, 3B, one GPU
  step serving
  python benchmarks/serving.py --model /tmp/qwen3b --config configs/3b/serve.yaml --device "$GPU-3b" \
    --requests 24 --new-tokens 64 --repeats 3 --out "$OUT/serve-$GPU-3b.json" "auth_token_env=''" 'resources={}' max_model_len=4096 "$@"  # the random 3B shape's context: 4096
}

evaluate() {  # issue 21: the evaluate stage vs a per-sample HF generate_latent loop, 3B, one GPU
  step evaluate
  [ -f /tmp/world/dsr/benchmark.parquet ] || python -m fourdthinker synth --out /tmp/world --videos 8 --seed 0
  (cd benchmarks && python evaluate.py --model /tmp/qwen3b --benchmark /tmp/world/dsr/benchmark.parquet \
     --samples 16 --max-new-tokens 64 --batch-size 16 --cpus 8 --repeats 3 --device "$GPU-3b" \
     num_gpus_per_actor=1 'actor_resources={}' max_model_len=4096 'engine_kwargs={enforce_eager: true, gpu_memory_utilization: 0.5}' "$@")
  cp benchmarks/results/evaluate-"$GPU"-3b.json "$OUT/" 2>/dev/null
}

for s in "$@"; do
  case $s in
    tests_gpu:*) IFS=: read -r name tag rest <<< "$s"; tests_gpu ${rest//,/ } ;;
    dift:*|grpo_1gpu:*|grpo_2gpu:*|sync_colocated:*|sync_2gpu:*|rollout:*|preprocess:*) IFS=: read -r name tag rest <<< "$s"; "$name" "$tag" ${rest//,/ } ;;
    *) "$s" ;;
  esac
done
