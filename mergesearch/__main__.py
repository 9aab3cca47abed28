from mergesearch.cli import main

raise SystemExit(main())
