"""MLproject entry point `evaluate`: not implemented yet (issue 3)."""

import sys

print("error: the evaluate entry point is not implemented yet (tracked in issue 3).", file=sys.stderr)
sys.exit(2)
