from statecore.cli import main

raise SystemExit(main())
