"""MLproject entry point `promote`: not implemented yet (issue 4)."""

import sys

print("error: the promote entry point is not implemented yet (tracked in issue 4).", file=sys.stderr)
sys.exit(2)
