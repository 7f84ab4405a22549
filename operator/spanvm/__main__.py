"""`python -m spanvm`: the `spanvm` command."""

import sys

from spanvm.entry import main

sys.exit(main())
