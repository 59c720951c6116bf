"""The chaos server as a program file, for the warm fork server (``prefork.command(zygote,
"program", this file, ...)``): the same ``main`` as ``python -m rmcp_actors.testing.chaos_server``."""

from rmcp_actors.testing.chaos_server import main

if __name__ == "__main__":
    main()
