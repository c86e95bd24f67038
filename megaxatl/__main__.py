"""`python -m megaxatl ...` is the `megaxatl` command."""

import sys

from megaxatl.cli import main

sys.exit(main())
