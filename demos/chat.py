"""`python demos/chat.py --run DIR [options]` is `raft demo chat --run DIR [options]` (raft/demos/chat.py holds the app)."""

import sys

from raft.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", "chat", *sys.argv[1:]]))
