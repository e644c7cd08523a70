from reprolora.cli import main

raise SystemExit(main())
