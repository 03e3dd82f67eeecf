"""``python -m foldops``: the same as the ``foldops`` command."""

from foldops.cli import main

raise SystemExit(main())
