#!/usr/bin/env python3
"""The seed article's mmap writer (docs/tutorial.md): map a sparse file bigger than the
disk and store 1 MiB chunks into it, printing each chunk's number before storing it.

    python3 mmaptest.py [FILE_MIB] [CHUNKS]     (default 64 and 64; in the current directory)

On ext4 the store that finds no free block is killed by SIGBUS; on quotafs it is too with
--mmap-sigbus, while plain FUSE lets every store through and refuses the pages later, at
writeback, where this program never looks.
"""

import mmap
import sys

MiB = 1024 * 1024

size = int(sys.argv[1]) if len(sys.argv) > 1 else 64
chunks = int(sys.argv[2]) if len(sys.argv) > 2 else size

with open("mmaptestfile", "w+b") as f:
    f.truncate(size * MiB)  # sparse: takes no space yet
    mm = mmap.mmap(f.fileno(), 0)
    offset = 0
    for i in range(chunks):
        print(i, flush=True)
        mm[offset:offset + MiB] = b"0" * MiB
        offset += MiB
    mm.close()
