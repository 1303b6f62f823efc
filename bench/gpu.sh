#!/usr/bin/env bash
# The one-GPU check: trains bench_llama_1b in bfloat16 (tokens/s, MFU against the data-sheet peak)
# and decodes at batch 1 and 32, then writes the figures to bench/results.md (bench/gpu.py does
# the measuring; bench/README.md says more).
#
#   bench/gpu.sh [--install [--wheels DIR]] [--smoke] [other options of python -m bench.gpu]
#
# 1. nvidia-smi lists a GPU (not with --smoke, which runs a tiny model on the CPU instead);
# 2. with --install: pip installs nnxlm (-e .) and jax's CUDA plugin for the installed jax version,
#    cuda13 where the driver runs CUDA 13, else cuda12 (NNXLM_JAX_CUDA=cuda12|cuda13 chooses),
#    from the network or, with --wheels DIR, only from wheels downloaded there beforehand;
# 3. nnxlm imports, jax has a CUDA plugin of its own version and sees the GPU: otherwise one line
#    says what is missing, and the script exits with 2;
# 4. python -m bench.gpu, under a time limit (NNXLM_GPU_TIMEOUT seconds, default 540).
#
# PYTHON chooses the interpreter (default: the repository's .venv, else python3). Nothing here
# downloads anything unless --install is given without --wheels.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

fail() {
  echo "bench/gpu.sh: $*" >&2
  exit 2
}

install=0 wheels="" smoke=0 args=()
while (($#)); do
  case $1 in
    --install) install=1 ;;
    --wheels)
      (($# > 1)) || fail "--wheels needs a directory of wheels"
      wheels=$2 install=1
      shift
      ;;
    --smoke) smoke=1 args+=(--smoke) ;;
    *) args+=("$1") ;;
  esac
  shift
done

python=${PYTHON:-}
if [[ -z $python ]]; then
  if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi

gpu="" driver_cuda=""
if ((!smoke)); then
  command -v nvidia-smi >/dev/null ||
    fail "no nvidia-smi here: run this on a machine with an NVIDIA GPU and its driver (or --smoke on a CPU)"
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1) || true
  [[ -n $gpu ]] || fail "nvidia-smi lists no GPU: check the driver (nvidia-smi alone says more)"
  # the newest CUDA the driver runs, from nvidia-smi's header ("CUDA Version: 13.0")
  driver_cuda=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p' | head -n 1) || true
fi
cuda_extra=${NNXLM_JAX_CUDA:-}
if [[ -z $cuda_extra ]]; then
  if [[ ${driver_cuda%%.*} =~ ^[0-9]+$ ]] && ((${driver_cuda%%.*} >= 13)); then cuda_extra=cuda13; else cuda_extra=cuda12; fi
fi

jax_version() { "$python" -c 'from importlib.metadata import version; print(version("jax"))' 2>/dev/null; }

if ((install)); then
  source_args=()
  [[ -z $wheels ]] || source_args=(--no-index --find-links "$wheels")
  from=${wheels:+ from $wheels}
  "$python" -m pip install -q ${source_args[@]+"${source_args[@]}"} -e . ||
    fail "pip install -e .${from} failed (its output is above)"
  if ((!smoke)); then
    version=$(jax_version) || fail "jax is not installed after pip install -e ."
    "$python" -m pip install -q ${source_args[@]+"${source_args[@]}"} "jax[$cuda_extra]==$version" ||
      fail "pip install 'jax[$cuda_extra]==$version'${from} failed (its output is above)"
  fi
fi

"$python" -c 'import nnxlm' 2>/dev/null ||
  fail "nnxlm does not import with $python: bench/gpu.sh --install (needs the network, or --wheels DIR: bench/README.md)"

if ((!smoke)); then
  version=$(jax_version)
  # jax's CUDA support is a plugin package of exactly jax's version (jax[cuda12] / jax[cuda13])
  plugin=$("$python" - <<'EOF'
from importlib import metadata

for name in ("jax-cuda13-plugin", "jax-cuda12-plugin"):
    try:
        print(f"{name} {metadata.version(name)}")
        break
    except metadata.PackageNotFoundError:
        pass
EOF
  )
  install_hint="install 'jax[$cuda_extra]==$version' beforehand (bench/gpu.sh --install; without network --wheels DIR, see bench/README.md)"
  [[ -n $plugin ]] || fail "jax $version is installed without CUDA (no jax-cuda12/13-plugin): $install_hint"
  [[ ${plugin#* } == "$version" ]] || fail "jax $version with $plugin: the versions must match; $install_hint"
  # JAX_PLATFORMS=cuda makes a GPU that cannot start an error (its reason is the last line) instead
  # of a quiet fall-back to the CPU
  probe=$(JAX_PLATFORMS=cuda "$python" -c 'import jax; print(jax.devices()[0].device_kind)' 2>&1) ||
    fail "jax $version with $plugin cannot use the $gpu (driver CUDA ${driver_cuda:-unknown}): $(grep -v '^\s*$' <<<"$probe" | tail -n 1)"
  echo "$gpu (driver CUDA ${driver_cuda:-unknown}); jax $version, $plugin; $python"
  # the one process on the GPU: let JAX's allocator take 90 % of its memory instead of 75 %
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
fi

limit=${NNXLM_GPU_TIMEOUT:-540}
status=0
timeout "$limit" "$python" -m bench.gpu ${args[@]+"${args[@]}"} || status=$?
((status != 124)) || fail "python -m bench.gpu ran past $limit s (NNXLM_GPU_TIMEOUT) and was stopped"
exit "$status"
