"""`python -m tokenrelay` is the same as the `tokenrelay` command."""

from tokenrelay.cli import main

raise SystemExit(main())
