from reprolora.cli.main import main

raise SystemExit(main())
