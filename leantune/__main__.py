"""`python -m leantune ...` runs the `leantune` command (e.g. from a checkout without the console script)."""
from .cli import main

if __name__ == "__main__":
    main()
