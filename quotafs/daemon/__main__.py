"""`python -m quotafs.daemon CONFIG_FD [READY_FD]`: the mount's server process."""

import sys

from quotafs.daemon.serve import main

sys.exit(main())
