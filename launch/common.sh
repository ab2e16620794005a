# Shared by the launch scripts: error helper, checks, and the Python that runs msmoe_dist.
die() { echo "${SCRIPT_NAME:-launch}: error: $*" >&2; exit 2; }
need() {  # need VAR "what it should be"
    [[ -n "${!1:-}" ]] || die "$1 is not set (expected $2)"
}
positive_int() {  # positive_int VAR
    [[ "${!1}" =~ ^[1-9][0-9]*$ ]] || die "$1=${!1} is not a positive integer"
}
# The interpreter: $PYTHON, else the README's virtual environment, else python3.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
run_or_print() {  # DRY_RUN=1 prints the command instead of running it
    if [[ "${DRY_RUN:-0}" == "1" ]]; then printf '%q ' "$@"; echo; exit 0; fi
    exec "$@"
}
