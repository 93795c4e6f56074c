"""tensorps: the admin command line."""
