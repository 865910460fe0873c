"""A tamper-evident audit trail of a run: who did what, in which round, with which digests.

Each entry is a row of an SQLite file whose hash covers its content and the previous entry's
hash, so editing, deleting or reordering rows breaks the chain; deleting rows at the tail is
caught against a head (seq, hash) recorded in a checkpoint or the run summary. The log holds
digests and figures only, never raw data or weights.

- `worldlm.audit.chain`: the canonical encoding and hash of one entry (pure functions).
- `worldlm.audit.log`: `AuditLog` (append, head, truncate_after) and `verify`.
- `worldlm.audit.show`: a rich table of the entries, filtered by node subtree and round.
- `worldlm.audit.cli`: `worldlm audit verify|show RUN_DIR`.

Only the error lives here, so that importing it (as every submodule does) loads nothing else.
"""

from __future__ import annotations

from worldlm.errors import WorldLMError


class AuditError(WorldLMError):
    """An audit log cannot be written or read: a forbidden field value, a log of another run,
    or a file that is not a worldlm audit log."""
