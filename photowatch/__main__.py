from photowatch.cli import main

raise SystemExit(main())
