"""The loop-ext4 as a `Reference` (reference/base.py): what `compare -- CMD` needs of it.

The program runs in quotafs's own namespaces, so both names of the directory are the
mount point; the room of the quotafs to compare with is the loop's room as runner.run_compare
measures it (write capacity and root's reserve)."""

from __future__ import annotations

import dataclasses
import os

from quotafs.reference.base import Launch
from quotafs.reference.loopext4 import Ext4Loop


@dataclasses.dataclass(frozen=True)
class Ext4Reference:
    loop: Ext4Loop

    @property
    def kind(self) -> str:
        return "ext4"

    @property
    def inside_path(self) -> str:
        return self.loop.mountpoint

    @property
    def outside_path(self) -> str:
        return self.loop.mountpoint

    @property
    def quotafs_limit(self) -> int:
        return self.loop.write_capacity_hint

    @property
    def quotafs_reserve(self) -> int:
        return self.loop.root_reserve_bytes

    def launch(self, user: str | None) -> Launch:
        return Launch(user=user)

    def used_bytes(self) -> int:
        st = os.statvfs(self.loop.mountpoint)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def describe(self) -> dict[str, object]:
        info: dict[str, object] = {"kind": "ext4"}
        info.update({k: v for k, v in dataclasses.asdict(self.loop).items() if k != "rounds"})
        info["known_differences"] = []  # it is the filesystem quotafs imitates
        return info
