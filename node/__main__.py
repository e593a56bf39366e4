"""`python -m node ...` is the same as the `meshnode` command."""

import sys

from node.cli import main

sys.exit(main())
