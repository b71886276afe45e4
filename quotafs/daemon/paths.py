"""Paths below the mount of known nodes, for fault rules and events ("/"-prefixed).

Built from the names the inode table remembers and cached per node (every request of an
idle fault rule asks), except for pinned nodes: a hard link or an unlinked inode, whose
remembered name may be gone, so the kernel is asked where the descriptor is now.
"""

from __future__ import annotations

import os

from quotafs.daemon.inodes import InodeTable, Node


class Paths:
    @property
    def backing(self) -> str:
        """The backing directory, resolved."""
        return self._backing_real

    def __init__(self, inodes: InodeTable, backing: str) -> None:
        self._inodes = inodes
        self._backing_real = os.path.realpath(backing)
        self._backing_prefix = self._backing_real.rstrip("/") + "/"

    def of_fd(self, fd: int) -> str:
        """The path below the mount of an inode's O_PATH descriptor, as the kernel has it."""
        try:
            path = os.readlink(f"/proc/self/fd/{fd}").removesuffix(" (deleted)")
        except OSError:
            return "?"
        # The kernel gives the canonical path: below the backing root, a plain prefix.
        if path == self._backing_real:
            return "/"
        if path.startswith(self._backing_prefix):
            return path[len(self._backing_prefix) - 1:]
        return "?"

    def of(self, node: Node) -> str:
        """The node's path below the mount."""
        inodes = self._inodes
        gen, root = inodes.names_gen, inodes.root
        if node is root:
            return "/"
        if node.pinned:
            return self.of_fd(inodes.fd(node))
        # Walk up to the nearest node whose cached path is current, then fill in downward.
        chain: list[Node] = []
        walk: Node | None = node
        while walk is not None and walk.path_gen != gen:
            if walk is root:
                walk.path, walk.path_gen = "/", gen
                break
            if walk.pinned:  # an ancestor: cannot happen for directories, but be safe
                base = self.of_fd(inodes.fd(walk))
                return base.rstrip("/") + "".join(
                    "/" + os.fsdecode(n.name) for n in reversed(chain))
            chain.append(walk)
            walk = walk.parent
        base = walk.path if walk is not None else "?"
        for below in reversed(chain):
            base = below.path = ("" if base == "/" else base) + "/" + os.fsdecode(below.name)
            below.path_gen = gen
        return base

    def of_entry(self, directory: Node | None, name: bytes | None) -> str:
        """The path of `name` in `directory` (the directory's own for None; "?" for an
        unknown directory)."""
        base = self.of(directory) if directory is not None else "?"
        return base if name is None else base.rstrip("/") + "/" + os.fsdecode(name)
