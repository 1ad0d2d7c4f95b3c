#!/usr/bin/env bash
# mypy --strict over the installed layout (gpufaas.shared, gpufaas.gateway, ...).
# The source folders are mapped onto the `gpufaas` namespace by pyproject, which mypy
# cannot follow, so this builds a tree of symbolic links in that layout and checks it.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=.build/typecheck
rm -rf "$tree" && mkdir -p "$tree/gpufaas"
for f in cli/*.py cli/py.typed; do ln -s "$PWD/$f" "$tree/gpufaas/$(basename "$f")"; done
ln -s "$PWD/shared" "$tree/gpufaas/shared"
for svc in gateway scheduler transfer memory tensorstore worker; do
  ln -s "$PWD/services/$svc" "$tree/gpufaas/$svc"
done
exec "${PYTHON:-python}" -m mypy --strict --config-file pyproject.toml "$tree/gpufaas" tests $(compgen -G "bench/*.py" >/dev/null && echo bench) $(compgen -G "scripts/*.py" >/dev/null && echo scripts/*.py) "$@"
