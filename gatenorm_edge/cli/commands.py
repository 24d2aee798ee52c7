"""Import every command module so that each registers its subcommands on the app."""

from . import frontier, measure, passkey, prune, score, study, zeroshot  # noqa: F401
