#!/usr/bin/env bash
# Create a separate virtualenv holding the reference package memoria-pytorch 1.1.0.
#
# Both the reference and this project import as `memoria`, so the reference must never be installed into the
# project's own environment. This venv is used only by scripts/reference_fixtures.py (to regenerate the parity
# fixtures) and by `scripts/bench_memoria.py --impl reference`.
#
# Usage: scripts/setup_reference_venv.sh [VENV_DIR]
#   default VENV_DIR: refvenv/ for 1.1.0, refvenv/v1.0.0/ for REF_VERSION=1.0.0 (both git-ignored).
# Env:   REF_VERSION (default 1.1.0; 1.0.0 is the version the paper pinned, with the exp weight form),
#        PYTHON (default python3), TORCH_SPEC (default torch==2.13.0; pip picks a CPU or CUDA wheel for the machine)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ref_version="${REF_VERSION:-1.1.0}"
case "$ref_version" in
    1.1.0) default_dir="$repo_root/refvenv" ;;
    1.0.0) default_dir="$repo_root/refvenv/v1.0.0" ;;
    *) echo "REF_VERSION must be 1.0.0 or 1.1.0, got $ref_version" >&2; exit 2 ;;
esac
venv_dir="${1:-$default_dir}"
python_bin="${PYTHON:-python3}"
torch_spec="${TORCH_SPEC:-torch==2.13.0}"

if [[ -n "${VIRTUAL_ENV:-}" && "$(cd "$VIRTUAL_ENV" && pwd)" == "$(cd "$repo_root" && pwd)/.venv" ]]; then
    echo "note: the project venv is active; the reference goes into its own venv at $venv_dir" >&2
fi

if [[ ! -x "$venv_dir/bin/python" ]]; then
    "$python_bin" -m venv "$venv_dir"
fi
pip_install() {
    # Hide pip's notes about unreachable local index folders; keep its exit status.
    "$venv_dir/bin/python" -m pip install --quiet "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
    return "${PIPESTATUS[0]}"
}
pip_install --upgrade pip
# numpy only silences torch's "Failed to initialize NumPy" warning.
pip_install "$torch_spec" "memoria-pytorch==$ref_version" numpy

# Check that the venv really holds the reference package (its __version__ string still says 1.0.0 in 1.1.0,
# so ask pip's metadata instead). Run from / so that the repository's own `memoria/` is not on sys.path.
(cd / && REF_VERSION="$ref_version" "$venv_dir/bin/python" - <<'PY'
import importlib.metadata as md
import os
import memoria
if "site-packages" not in memoria.__file__:
    raise SystemExit(f"`memoria` resolved to {memoria.__file__}, not the installed reference package")
version = md.version("memoria-pytorch")
if version != os.environ["REF_VERSION"]:
    raise SystemExit(f"expected memoria-pytorch {os.environ['REF_VERSION']} in the reference venv, found {version}")
print(f"reference venv ready: memoria-pytorch {version} at {memoria.__file__}")
PY
)
