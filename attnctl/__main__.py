"""``python -m attnctl``: the same command as ``attnctl``."""

from attnctl.cli import main

if __name__ == "__main__":
    main()
