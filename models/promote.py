"""``keyart promote VERSION --reason TEXT``: a reviewer makes a version the champion.

The override bypasses the OPE comparison of the gate but not the parity check: a version
whose ONNX parity failed is refused unless ``--force``. Who and why are written to the
version's tags (``keyart.promoted_by``, ``keyart.promotion_reason``) and to its run
(``keyart.override.*``); the previous champion stays in the history for ``keyart rollback``.
The statuses follow (``keyart.status``: ``champion`` here, ``former_champion`` on the one
replaced) and the override is added to the version's description.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging

from keyart import registry
from keyart.config import Settings
from keyart.config import settings as default_settings

log = logging.getLogger(__name__)


def reviewer(name: str | None = None) -> str:
    """The name recorded for a reviewer override (``--by``, else the login name)."""
    if name:
        return name
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"


def record_on_run(version: str, tags: dict[str, str], settings: Settings) -> None:
    """Also tag the MLflow run that produced ``version`` (when it has one)."""
    mv = registry.get_version(version, settings)
    if mv.run_id:
        c = registry.client(settings)
        for key, value in tags.items():
            c.set_tag(mv.run_id, key, value)


def note_on_version(version: str, line: str, settings: Settings) -> None:
    """Add a line to the version's description (overrides are read where the gate's decision is)."""
    from keyart.models.register import describe_version

    current = registry.get_version(version, settings).description or ""
    describe_version(version, f"{current}\n\n{line}".strip(), settings)


def promote_version(version: str, reason: str, by: str | None = None,
                    settings: Settings | None = None, force: bool = False) -> str | None:
    """Make ``version`` the champion as a reviewer override; return the previous champion."""
    settings = registry.configure(settings)
    if not reason.strip():
        raise registry.RegistryError("a reviewer override needs a --reason")
    mv = registry.get_version(version, settings)
    if mv.tags.get("keyart.parity_passed") == "false" and not force:
        raise registry.RegistryError(f"version {str(mv.version)} failed its ONNX parity check; "
                                     "use --force to promote it anyway")
    actor = reviewer(by)
    previous = registry.promote(str(mv.version), f"override: {reason}", actor=actor, settings=settings)
    from keyart.models.register import champion_changed

    champion_changed(str(mv.version), previous, settings)
    note_on_version(str(mv.version), f"**Promoted to champion by {actor}** (reviewer override, was "
                                     f"v{previous or 'none'}): {reason}", settings)
    record_on_run(str(mv.version), {"keyart.override.promoted_by": actor,
                               "keyart.override.promotion_reason": reason}, settings)
    return previous


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("version", help="registered version number of keyart-artwork")
    parser.add_argument("--reason", required=True, help="why (recorded on the version and its run)")
    parser.add_argument("--by", default=None, help="reviewer name (default: login name)")
    parser.add_argument("--force", action="store_true", help="promote even if ONNX parity failed")


def run(args: argparse.Namespace) -> int:
    try:
        previous = promote_version(args.version, args.reason, args.by, default_settings(), args.force)
    except registry.RegistryError as exc:
        log.error("promote: %s", exc)
        return 1
    print(json.dumps({"champion": str(args.version), "previous": previous}))
    return 0
