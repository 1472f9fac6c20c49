# shellcheck shell=bash
# Helper sourced by scripts/test.sh and scripts/demo.sh (not run on its own).

# setup_venv ROOT: create ROOT/.venv when missing (with $PYTHON, default python3), install
# requirements.txt into it when that file changed since the last install, and activate it.
setup_venv() {
  local root=$1 venv=$1/.venv
  if [[ ! -x $venv/bin/python ]]; then
    echo "creating $venv" >&2
    "${PYTHON:-python3}" -m venv "$venv"
  fi
  local stamp=$venv/.requirements.sha256 want
  want=$(sha256sum "$root/requirements.txt" | cut -d' ' -f1)
  if [[ ! -f $stamp || $(cat "$stamp") != "$want" ]]; then
    echo "installing requirements.txt into $venv (the first time takes a few minutes: torch)" >&2
    "$venv/bin/python" -m pip install --quiet --progress-bar off -r "$root/requirements.txt"
    echo "$want" > "$stamp"
  fi
  export VIRTUAL_ENV=$venv
  export PATH=$venv/bin:$PATH
}
