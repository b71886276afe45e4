"""The fastest a pyfuse3 daemon can be: a filesystem that keeps names and sizes in memory
and does no I/O at all (writes are discarded, reads return zeros).

It is the bench's ceiling target. Every request still crosses the kernel, libfuse,
pyfuse3 and trio exactly as it does for quotafs, so no pyfuse3 filesystem that stores
data can be faster than this one; when a goal is out of reach for it, the goal is out of
reach for quotafs too. It uses the same kernel cache timeouts as quotafs (60 s).

    python bench/nullfs.py [--xattr] [--keep-data] MOUNTPOINT

Without --xattr, getxattr answers ENOSYS, after which the kernel stops asking (and stops
sending GETXATTR "security.capability" before every write). With --xattr it answers
ENODATA like a filesystem that supports extended attributes, as quotafs must.

With --keep-data it keeps what is written in memory (one bytearray per file: one copy,
the least a filesystem that stores data does) and reads it back, so that programs that
read their own files (SQLite, tar, git) can run on it: the ceiling of the application
workloads. (The data of a file goes with its last name, even while it is open.) Rename
and link work in both modes, as those programs need.
"""

from __future__ import annotations

import argparse
import errno
import os
import stat
import time
from typing import Any

import pyfuse3
import trio

TIMEOUT = 60.0  # the kernel cache timeouts quotafs uses


class Node:
    __slots__ = ("attr", "children", "data", "name", "parent")

    def __init__(self, ino: int, mode: int, parent: int, name: bytes) -> None:
        now = time.time_ns()
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = pyfuse3.InodeT(ino)
        attr.st_mode = mode
        attr.st_nlink = 2 if stat.S_ISDIR(mode) else 1
        attr.st_uid = os.getuid()
        attr.st_gid = os.getgid()
        attr.st_size = 0
        attr.st_blksize = 4096
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = now
        attr.entry_timeout = TIMEOUT
        attr.attr_timeout = TIMEOUT
        attr.generation = 0
        self.attr = attr
        self.children: dict[bytes, int] | None = {} if stat.S_ISDIR(mode) else None
        self.data = bytearray()  # --keep-data: the file's bytes up to the last written
        self.parent = parent
        self.name = name


class NullFS(pyfuse3.Operations):
    def __init__(self, xattr: bool, keep_data: bool = False) -> None:
        super().__init__()
        self.xattr = xattr
        if keep_data:
            self.read, self.write = self._read_kept, self._write_kept  # type: ignore[method-assign]
        self.nodes: dict[int, Node] = {
            pyfuse3.ROOT_INODE: Node(pyfuse3.ROOT_INODE, stat.S_IFDIR | 0o755,
                                     pyfuse3.ROOT_INODE, b"")}
        self.next_ino = pyfuse3.ROOT_INODE + 1

    def _child(self, parent: int, name: bytes) -> Node:
        children = self.nodes[parent].children
        if children is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name not in children:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.nodes[children[name]]

    def _new(self, parent: int, name: bytes, mode: int) -> pyfuse3.EntryAttributes:
        children = self.nodes[parent].children
        assert children is not None
        if name in children:
            raise pyfuse3.FUSEError(errno.EEXIST)
        ino = self.next_ino
        self.next_ino += 1
        self.nodes[ino] = Node(ino, mode, parent, name)
        children[name] = ino
        return self.nodes[ino].attr

    async def lookup(self, parent_inode: Any, name: Any, ctx: Any = None) -> Any:
        if name == b".":
            return self.nodes[parent_inode].attr
        if name == b"..":
            return self.nodes[self.nodes[parent_inode].parent].attr
        return self._child(parent_inode, name).attr

    async def getattr(self, inode: Any, ctx: Any = None) -> Any:
        return self.nodes[inode].attr

    async def setattr(self, inode: Any, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
        node = self.nodes[inode].attr
        if fields.update_size:
            node.st_size = attr.st_size
            del self.nodes[inode].data[attr.st_size:]
        if fields.update_mode:
            node.st_mode = (node.st_mode & ~0o7777) | (attr.st_mode & 0o7777)
        if fields.update_mtime:
            node.st_mtime_ns = attr.st_mtime_ns
        return node

    async def statfs(self, ctx: Any) -> Any:
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 4096
        st.f_blocks = st.f_bfree = st.f_bavail = 1 << 30
        st.f_files = st.f_ffree = st.f_favail = 1 << 30
        st.f_namemax = 255
        return st

    async def mkdir(self, parent_inode: Any, name: Any, mode: Any, ctx: Any) -> Any:
        self.nodes[parent_inode].attr.st_nlink += 1
        return self._new(parent_inode, name, stat.S_IFDIR | (mode & 0o7777))

    async def create(self, parent_inode: Any, name: Any, mode: Any, flags: Any,
                     ctx: Any) -> Any:
        attr = self._new(parent_inode, name, stat.S_IFREG | (mode & 0o7777))
        return pyfuse3.FileInfo(fh=attr.st_ino), attr

    async def mknod(self, parent_inode: Any, name: Any, mode: Any, rdev: Any,
                    ctx: Any) -> Any:
        return self._new(parent_inode, name, mode)

    async def _remove(self, parent_inode: int, name: bytes) -> None:
        node = self._child(parent_inode, name)
        if node.children:
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        children = self.nodes[parent_inode].children
        assert children is not None
        del children[name]
        # The inode stays until forget: open handles may still use it.

    async def unlink(self, parent_inode: Any, name: Any, ctx: Any) -> None:
        node = self._child(parent_inode, name)
        await self._remove(parent_inode, name)
        node.attr.st_nlink -= 1
        if node.attr.st_nlink <= 0:  # no forget bookkeeping: free the data with the name
            node.data = bytearray()

    async def rmdir(self, parent_inode: Any, name: Any, ctx: Any) -> None:
        await self._remove(parent_inode, name)
        self.nodes[parent_inode].attr.st_nlink -= 1

    async def forget(self, inode_list: Any) -> None:
        pass  # a bench run creates few enough inodes to keep them all

    async def open(self, inode: Any, flags: Any, ctx: Any) -> Any:
        if flags & os.O_TRUNC:
            self.nodes[inode].attr.st_size = 0
            self.nodes[inode].data.clear()
        return pyfuse3.FileInfo(fh=inode)

    async def read(self, fh: Any, off: Any, size: Any) -> bytes:
        length = max(0, min(size, self.nodes[fh].attr.st_size - off))
        return bytes(length)

    async def write(self, fh: Any, off: Any, buf: bytes) -> int:
        attr = self.nodes[fh].attr
        end = off + len(buf)
        if end > attr.st_size:
            attr.st_size = end
        return len(buf)

    async def _read_kept(self, fh: Any, off: Any, size: Any) -> bytes:
        node = self.nodes[fh]
        length = max(0, min(size, node.attr.st_size - off))
        data = bytes(node.data[off:off + length])
        return data + bytes(length - len(data))  # past the last write: a hole

    async def _write_kept(self, fh: Any, off: Any, buf: bytes) -> int:
        node = self.nodes[fh]
        data = node.data
        if off > len(data):
            data.extend(bytes(off - len(data)))
        data[off:off + len(buf)] = buf
        end = off + len(buf)
        if end > node.attr.st_size:
            node.attr.st_size = end
        return len(buf)

    async def rename(self, parent_inode_old: Any, name_old: Any, parent_inode_new: Any,
                     name_new: Any, flags: Any, ctx: Any) -> None:
        ino = self._child(parent_inode_old, name_old).attr.st_ino
        old_children = self.nodes[parent_inode_old].children
        new_children = self.nodes[parent_inode_new].children
        assert old_children is not None and new_children is not None
        replaced = new_children.get(name_new)
        if replaced is not None and self.nodes[replaced].children:
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        del old_children[name_old]
        new_children[name_new] = ino
        node = self.nodes[ino]
        node.parent, node.name = parent_inode_new, name_new

    async def link(self, inode: Any, new_parent_inode: Any, new_name: Any, ctx: Any) -> Any:
        children = self.nodes[new_parent_inode].children
        assert children is not None
        if new_name in children:
            raise pyfuse3.FUSEError(errno.EEXIST)
        children[new_name] = inode
        self.nodes[inode].attr.st_nlink += 1
        return self.nodes[inode].attr

    async def flush(self, fh: Any) -> None:
        pass

    async def fsync(self, fh: Any, datasync: Any) -> None:
        pass

    async def release(self, fh: Any) -> None:
        pass

    async def opendir(self, inode: Any, ctx: Any) -> Any:
        return inode

    async def readdir(self, fh: Any, start_id: int, token: Any) -> None:
        children = self.nodes[fh].children
        assert children is not None
        entries = list(children.items())
        for index in range(start_id, len(entries)):
            name, ino = entries[index]
            if not pyfuse3.readdir_reply(token, name, self.nodes[ino].attr, index + 1):
                return

    async def releasedir(self, fh: Any) -> None:
        pass

    async def fsyncdir(self, fh: Any, datasync: Any) -> None:
        pass

    async def getxattr(self, inode: Any, name: Any, ctx: Any) -> bytes:
        raise pyfuse3.FUSEError(errno.ENODATA if self.xattr else errno.ENOSYS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mountpoint")
    parser.add_argument("--xattr", action="store_true",
                        help="answer getxattr with ENODATA instead of ENOSYS")
    parser.add_argument("--keep-data", action="store_true",
                        help="keep written data in memory and read it back (and support "
                             "rename and link)")
    args = parser.parse_args()
    options = set(pyfuse3.default_options)
    options.add("fsname=nullfs")
    pyfuse3.init(NullFS(args.xattr, args.keep_data), args.mountpoint, options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
