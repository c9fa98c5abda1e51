"""Herald as a process: the app's assembly, the runner, drain and the CLI."""
