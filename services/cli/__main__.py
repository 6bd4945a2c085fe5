"""``python -m services.cli`` is the ``ridethrough`` command."""

import sys

from services.cli import main

sys.exit(main())
