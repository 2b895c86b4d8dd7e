"""`python -m appliance.cli`: the `appliance` command without its script."""

import sys

from appliance.cli import main

sys.exit(main())
