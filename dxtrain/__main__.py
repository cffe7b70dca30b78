"""``python -m dxtrain`` (and ``torchrun -m dxtrain``) runs the CLI."""

from .cli import main

main()
