from rrto_server.cli import main

raise SystemExit(main())
