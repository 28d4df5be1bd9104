"""CLI subcommands: parse arguments, call the library, print. The only code that prints."""
