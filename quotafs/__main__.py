from quotafs.cli.main import main

raise SystemExit(main())
