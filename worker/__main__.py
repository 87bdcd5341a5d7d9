"""`python -m worker`: one training worker (the same as `modulora worker`)."""

import sys

from worker.cli import main

sys.exit(main())
