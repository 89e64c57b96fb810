from fourdthinker.cli import main

raise SystemExit(main())
