"""Allow `python -m virtfreeze`."""

from virtfreeze.cli import main

if __name__ == "__main__":
    main()
