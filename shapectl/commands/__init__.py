"""The subcommands: each module has register(subparsers), whose parsers set func(args) -> int."""
