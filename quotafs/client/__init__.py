"""Everything that talks to a mount from outside: its lifecycle, its control channel, the API."""
