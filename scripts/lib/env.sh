# Shell helpers shared by the launchers (source this file; do not run it).
#
# Env files under configs/ are plain `NAME=value` lines (blank lines and lines
# starting with `#` are ignored; values are taken literally, no quoting or
# expansion). skcgolf/trainrun.py reads them with the same rules for Python.

# load_env_file FILE: export every NAME=value of FILE whose NAME is not already
# set, so that variables given on the command line or in the environment win.
# Call it for the highest-precedence file first (an overlay, then its base).
load_env_file() {
    local file=$1 line name value lineno=0
    if [[ ! -f $file ]]; then
        echo "error: env file $file does not exist" >&2
        return 1
    fi
    while IFS= read -r line || [[ -n $line ]]; do
        lineno=$((lineno + 1))
        line=${line%$'\r'}
        [[ -z ${line//[[:space:]]/} || $line =~ ^[[:space:]]*# ]] && continue
        if [[ ! $line =~ ^([A-Z_][A-Z0-9_]*)=(.*)$ ]]; then
            echo "error: $file:$lineno is not a NAME=value line: $line" >&2
            return 1
        fi
        name=${BASH_REMATCH[1]}
        value=${BASH_REMATCH[2]}
        if [[ -z ${!name+set} ]]; then
            export "$name=$value"
        fi
    done <"$file"
}
