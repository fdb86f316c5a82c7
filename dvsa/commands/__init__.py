"""One module per ``dvsa`` subcommand: ``HELP``, ``add_arguments(parser)``, ``run(args)``."""
