"""`python demos/image.py --run DIR [options]` is `raft demo image --run DIR [options]` (raft/demos/image.py holds the app)."""

import sys

from raft.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", "image", *sys.argv[1:]]))
