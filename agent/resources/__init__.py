"""One module per resource kind. Each kind has check() (reads, never mutates) and
apply() (re-checks right before it mutates, through `host` only), and both return a
Change: the one result type of the whole pipeline (Ansible-shaped).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FILE_KINDS = ("file", "directory", "symlink")


@dataclass
class Change:
    id: str
    changed: bool = False
    failed: bool = False
    msg: str = ""
    diff: str = ""
    action: str = "none"  # none | create | update | remove | restore | prune | ...
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = {"id": self.id, "changed": self.changed, "failed": self.failed, "msg": self.msg,
               "action": self.action}
        if self.diff:
            out["diff"] = self.diff
        return out
