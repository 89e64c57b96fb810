# Source on the lent GPU machine (the `device` tool), from the repository root, once the packages
# staged by ../shared/tools/device-stage.sh are unpacked under /tmp/site:
#   source benchmarks/gpu/env.sh
# It puts the staged packages and this checkout on the path and registers the vLLM plugin entry
# point (what `pip install -e .` would write; the machine has no registry to install from).
export PYTHONPATH=/tmp/site:$PWD
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
dist=/tmp/site/fourdthinker-0.1.0.dist-info
mkdir -p "$dist"
printf 'Metadata-Version: 2.1\nName: fourdthinker\nVersion: 0.1.0\n' > "$dist/METADATA"
printf '[vllm.general_plugins]\nfourdthinker_latent = fourdthinker.vllm_plugin:register\n' > "$dist/entry_points.txt"
