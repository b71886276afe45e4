#!/usr/bin/env python3
"""The seed article's mmap writer (docs/tutorial.md): map a sparse file bigger than the
disk and store 1 MiB chunks into it, printing each chunk's number before storing it.

    python3 mmaptest.py [FILE_MIB] [CHUNKS]     (default 64 and 64; in the current directory)
    python3 mmaptest.py --verify                 (the check: is what it stored there?)

On ext4 the store that finds no free block is killed by SIGBUS; on quotafs it is too with
--mmap-sigbus, while plain FUSE lets every store through and refuses the pages later, at
writeback, where this program never looks.
"""

import mmap
import os
import sys

MiB = 1024 * 1024

if sys.argv[1:] == ["--verify"]:
    # Run after the writer: if it said it was done, every chunk it stored must be there.
    done = [name for name in os.listdir() if name.startswith("done-")]
    if not done:
        sys.exit(0)  # it did not finish, so it promised nothing
    chunks = int(done[0].removeprefix("done-"))
    with open("mmaptestfile", "rb") as f:
        intact = sum(f.read(MiB) == b"0" * MiB for _ in range(chunks))
    if intact < chunks:
        print(f"only {intact} of the {chunks} chunks stored are in the file", file=sys.stderr)
        sys.exit(1)
    sys.exit(0)

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
# Say so in a name, not in data: an empty file needs no block on a full disk.
open(f"done-{chunks}", "w").close()
