"""Sub-commands of the ``queryshift`` CLI; each module defines ``add_parser(subparsers)`` and ``main(args)``."""
