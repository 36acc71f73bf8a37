"""``python -m infer.cli``: the ``infer`` command."""

import sys

from infer.cli.main import main

sys.exit(main())
