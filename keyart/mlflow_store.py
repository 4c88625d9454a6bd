"""Artifact locations of the local MLflow store that move with keyart's home.

MLflow records every experiment's, run's and logged model's artifact location in the
tracking database when it creates them, and records a local folder as an absolute
``file:///…`` URI: a moved ``var/`` would still point at the old folder. keyart therefore
gives the experiment it creates on a local artifact root the location ``keyart-artifacts:/``,
and MLflow derives the others from it (``keyart-artifacts:/<run>/artifacts``,
``keyart-artifacts:/models/<model id>/artifacts``). This module is the MLflow artifact
repository of that scheme (entry point ``mlflow.artifact_repository`` in pyproject.toml, so
every MLflow process of the environment, ``mlflow ui`` and ``mlflow server`` included,
loads it): MLflow's own local repository, with the folder resolved each time a repository
is made, against :func:`local_root`:

* in a keyart process, the root :func:`keyart.registry.configure` last set (the artifact root
  of the settings it was given);
* elsewhere (an ``mlflow ui`` or ``mlflow server`` over the SQLite store), the artifact root of
  the settings the environment gives (``KEYART_HOME``, ``KEYART_MLFLOW_ARTIFACT_ROOT``,
  ``KEYART_CONFIG``).

MLflow loads its artifact repository plugins while it imports its artifact store: this module
imports nothing of MLflow at its top (``KeyartArtifactRepository``, the entry point, is built
on first access), so importing it first cannot interrupt that import, and keyart's
configuration is read only when a location is resolved.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

if TYPE_CHECKING:
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    from keyart.config import Settings

SCHEME = "keyart-artifacts"
ROOT_URI = f"{SCHEME}:/"  # an experiment's location: the artifact root itself

_active_root: Path | None = None


def local_root(settings: Settings | None = None) -> Path:
    """The folder ``keyart-artifacts:/`` stands for: the settings' artifact root when it is a
    local folder, else the default one under the home (``<home>/mlflow/artifacts``: a store
    whose runs were logged with a remote root never holds such locations)."""
    if settings is None:
        if _active_root is not None:
            return _active_root
        from keyart.config import Settings

        settings = Settings()
    root = settings.artifact_root
    parsed = urlparse(root)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path)).expanduser().resolve()
    if parsed.scheme == "":
        return Path(root).expanduser().resolve()
    return (settings.home / "mlflow" / "artifacts").expanduser().resolve()


def is_local(settings: Settings) -> bool:
    """Whether the settings' artifact root is a local folder (a plain path or ``file:``)."""
    return urlparse(settings.artifact_root).scheme in ("", "file")


def use_root(root: Path | None) -> None:
    """Resolve ``keyart-artifacts:`` against ``root`` in this process (None: read settings)."""
    global _active_root
    _active_root = root


def to_path(uri: str, root: Path | None = None) -> Path:
    """The local folder of a ``keyart-artifacts:`` URI (under ``root``, default :func:`local_root`)."""
    from mlflow.exceptions import MlflowException

    parsed = urlparse(uri)
    if parsed.scheme != SCHEME or parsed.netloc or parsed.query or parsed.fragment:
        raise MlflowException(f"not a {SCHEME}:/<path> artifact location: {uri!r}")
    parts = [p for p in PurePosixPath(unquote(parsed.path)).parts if p not in ("/", ".")]
    if ".." in parts:
        raise MlflowException(f"{uri!r}: an artifact location may not leave the artifact root")
    return (root or local_root()).joinpath(*parts)


@cache
def repository_class() -> type[LocalArtifactRepository]:
    """MLflow's local artifact repository over ``keyart-artifacts:/<path>``: the folder
    ``<artifact root>/<path>``, the root read when a repository is made."""
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    class KeyartArtifactRepository(LocalArtifactRepository):
        __doc__ = repository_class.__doc__

        def __init__(self, artifact_uri: str, tracking_uri: str | None = None,
                     registry_uri: str | None = None) -> None:
            super().__init__(artifact_uri, tracking_uri, registry_uri)
            self._artifact_dir = str(to_path(artifact_uri))

    return KeyartArtifactRepository


def __getattr__(name: str) -> Any:
    # The entry point names KeyartArtifactRepository; MLflow asks for it only once its own
    # local repository is imported.
    if name == "KeyartArtifactRepository":
        return repository_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
