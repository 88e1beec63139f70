"""`python -m snella`: the same command line as the `snella` console script."""

from snella.cli import main

raise SystemExit(main())
