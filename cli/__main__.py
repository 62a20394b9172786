"""`python -m gcond_cli ...` runs the gcond CLI (also `torchrun ... -m gcond_cli train RECIPE`)."""

from .app import main

if __name__ == "__main__":
    main()
