"""``python -m mtanet.cli``: the ``mtanet`` command (``torchrun -m mtanet.cli train ...`` runs it this way)."""

from mtanet.cli import main

raise SystemExit(main())
