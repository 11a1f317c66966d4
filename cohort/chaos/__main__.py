"""``python -m cohort.chaos --data-dir DIR [--minutes N] ...``: see :mod:`cohort.chaos.runner`."""

import sys

from cohort.chaos.runner import main

sys.exit(main())
