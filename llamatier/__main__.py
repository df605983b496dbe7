"""`python -m llamatier` runs the CLI (commands that run llama.cpp under a crash supervisor)."""

from llamatier.supervise import main

if __name__ == "__main__":
    main()
