"""`python -m llamatier` runs the CLI."""

from llamatier.cli import main

if __name__ == "__main__":
    main()
