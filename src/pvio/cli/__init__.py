"""pvio.cli: the `pvio` command.  Each subcommand lives in its own module and is loaded
only when it runs, so `pvio --help` stays fast and a subcommand's imports cost nothing to
the others."""
