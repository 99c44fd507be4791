"""The application tier: one package per application, each a `Config` dataclass and a `run_*(config) -> Result`.
An application imports only the API and the core, never another application and never the CLI."""
