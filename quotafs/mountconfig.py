"""Everything a daemon needs to know to mount, as one serialisable record."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class MountConfig:
    mountpoint: str
    backing: str
    limit: int | None
    private_backing: bool = False
    keep_backing: bool = False
    inodes: int | None = None
    reserve: int = 0  # bytes below the limit for root only (resolved from --reserve)
    kept_back: int = 0  # bytes below the limit for nobody (--like-ext4: ext4's clusters)
    accounting: str = "blocks"
    block_size: int = 4096
    allow_other: bool = False
    debug: bool = False
    fsname: str = "quotafs"
    mmap_sigbus: bool = False
    no_cache: bool = False
    die_with_parent: bool = False
    seed: int | None = None  # fault rules' random seed (None: the daemon picks one)
    rules: list[dict[str, Any]] = field(default_factory=list)  # validated RuleSpec dicts
    log_file: str | None = None  # the daemon's log (WARNING and up), else its stderr

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> MountConfig:
        return cls(**json.loads(text))
