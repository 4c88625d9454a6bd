"""``keyart rollback --reason TEXT``: restore the champion before the current one.

The champion history (registered-model tag ``keyart.champion_history``) is walked back to
the newest earlier champion that still exists; the alias moves there and both versions get
tags saying who rolled back, when and why. Repeated rollbacks walk further back. Statuses
follow (``rolled_back`` on the version rolled back, ``champion`` on the one restored) and both
descriptions say so.
"""

from __future__ import annotations

import argparse
import json
import logging

from keyart import registry
from keyart.config import Settings
from keyart.config import settings as default_settings
from keyart.models.promote import note_on_version, record_on_run, reviewer

log = logging.getLogger(__name__)


def rollback_champion(reason: str, by: str | None = None,
                      settings: Settings | None = None) -> tuple[str, str]:
    """Restore the previous champion; return (rolled-back version, restored version)."""
    settings = registry.configure(settings)
    if not reason.strip():
        raise registry.RegistryError("a rollback needs a --reason")
    actor = reviewer(by)
    current, restored = registry.rollback(reason, actor=actor, settings=settings)
    from keyart.models.register import STATUS_ROLLED_BACK, champion_changed

    champion_changed(restored, current, settings, previous_status=STATUS_ROLLED_BACK)
    note_on_version(current, f"**Rolled back by {actor}** (v{restored} restored): {reason}", settings)
    note_on_version(restored, f"**Restored as champion by {actor}** (rollback of v{current}): {reason}", settings)
    record_on_run(current, {"keyart.override.rolled_back_by": actor,
                            "keyart.override.rollback_reason": reason}, settings)
    return current, restored


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reason", required=True, help="why (recorded on both versions)")
    parser.add_argument("--by", default=None, help="reviewer name (default: login name)")


def run(args: argparse.Namespace) -> int:
    try:
        current, restored = rollback_champion(args.reason, args.by, default_settings())
    except registry.RegistryError as exc:
        log.error("rollback: %s", exc)
        return 1
    print(json.dumps({"rolled_back": current, "champion": restored}))
    return 0
