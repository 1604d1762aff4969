"""`python -m gmpo ...` is the `gmpo` command (also what `accelerate launch -m gmpo train ...` runs)."""

from gmpo.cli import main

raise SystemExit(main())
