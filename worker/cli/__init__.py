"""Every command-line stage below the API (``configure(parser)`` + ``run(args)``), named after its command."""
