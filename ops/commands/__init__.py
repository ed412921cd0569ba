"""``ops`` subcommands: each module adds its parser with ``register(subparsers)``."""
