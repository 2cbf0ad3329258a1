"""Start Concept Studio: `python launch.py [--model ...] [--host ...] [--port ...]` (same as `python -m studio`)."""
import sys

from studio.cli import main

if __name__ == "__main__":
    sys.exit(main())
