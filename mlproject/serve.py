"""MLproject entry point `serve`: not implemented yet (issue 5)."""

import sys

print("error: the serve entry point is not implemented yet (tracked in issue 5).", file=sys.stderr)
sys.exit(2)
