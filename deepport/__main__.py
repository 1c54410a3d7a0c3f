"""``python -m deepport ...`` is the ``deepport`` command."""

from deepport.cli.main import main

raise SystemExit(main())
