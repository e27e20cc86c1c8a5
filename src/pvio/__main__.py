"""`python -m pvio` is the `pvio` command."""

from pvio.cli.main import main

main()
