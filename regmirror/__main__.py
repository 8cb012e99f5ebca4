from regmirror.cli import main

raise SystemExit(main())
