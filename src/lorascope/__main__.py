from lorascope.cli import main

raise SystemExit(main())
