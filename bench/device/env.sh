# Sourced by the scripts here, on the GPU machine: the unpacked binaries (bench/device/unpack.sh)
# and the benchmark model.
B=$PWD/devbin
export LD_LIBRARY_PATH=$B/lib:/usr/local/cuda/lib64:/usr/local/cuda/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
CFG=models/qwen3-30b-a3b/config.json
OUT=${OUT:-$PWD/device-out}
mkdir -p "$OUT"
