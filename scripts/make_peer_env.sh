#!/usr/bin/env bash
# Create (or update) .venv-peers: the peer loaders that perf/compare.py measures against flashpack.
#
# Usage: scripts/make_peer_env.sh [VENV_DIR]     (default: .venv-peers at the repository root)
#
# Idempotent: an existing virtualenv is reused and pip only installs what is missing. Each peer is
# installed on its own, so one that fails (no wheel for this platform, a build error) is reported and
# the others still install. torch is pinned to the main environment's version (TORCH_VERSION,
# default 2.13.0) so that every loader runs on the same torch.
# Fal's flashpack shares the import name `flashpack` with this project, so it lives here and never
# in the project's own .venv; compare.py runs it with --peer-python .venv-peers/bin/python.
set -uo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$root/.venv-peers}"
torch_version="${TORCH_VERSION:-2.13.0}"
python="${PYTHON:-python3}"
req="$root/perf/requirements-peers.txt"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv" || { echo "make_peer_env: cannot create $venv" >&2; exit 1; }
fi
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)

# torch first and alone, so no peer can drag in another version.
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$torch_version')" 2>/dev/null; then
    "${pip[@]}" "torch==$torch_version" || { echo "make_peer_env: torch==$torch_version failed to install" >&2; exit 1; }
fi
pin="$(mktemp)"; trap 'rm -f "$pin"' EXIT
echo "torch==$("$venv/bin/python" -c 'import torch; print(torch.__version__)')" > "$pin"

ok=(); failed=()
while IFS= read -r line; do
    spec="${line%%#*}"; spec="$(echo "$spec" | xargs)"
    [ -z "$spec" ] && continue
    if "${pip[@]}" -c "$pin" "$spec" >"$venv/install-${spec//[^A-Za-z0-9_.-]/_}.log" 2>&1; then
        ok+=("$spec")
    else
        failed+=("$spec")
        echo "make_peer_env: $spec failed; last lines of its log:" >&2
        tail -n 5 "$venv/install-${spec//[^A-Za-z0-9_.-]/_}.log" >&2
    fi
done < "$req"

echo "make_peer_env: $venv"
echo "  installed: ${ok[*]:-none}"
echo "  failed:    ${failed[*]:-none}"
(cd / && "$venv/bin/python" - <<'PY'
import importlib
for name in ("torch", "safetensors", "fastsafetensors", "runai_model_streamer", "tensorizer", "flashpack"):
    try:
        m = importlib.import_module(name)
        print(f"  import {name:22s} ok  {getattr(m, '__version__', '?')}")
    except Exception as e:  # noqa: BLE001 - a report line per peer
        print(f"  import {name:22s} FAILED: {type(e).__name__}: {e}")
PY
)
