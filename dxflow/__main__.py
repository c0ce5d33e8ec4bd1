from dxflow.cli import main

raise SystemExit(main())
