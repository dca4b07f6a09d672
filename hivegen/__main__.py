"""`python -m hivegen` is the `hivegen` command."""

import sys

from hivegen.cli import main

sys.exit(main())
