"""``python -m explaind``: the same command line as the ``explaind`` script (:func:`explaind.cli.main`)."""

from .cli import main

raise SystemExit(main())
