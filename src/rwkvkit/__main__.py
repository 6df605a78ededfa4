from rwkvkit.cli import main

raise SystemExit(main())
