from quotafs.cli import main

raise SystemExit(main())
