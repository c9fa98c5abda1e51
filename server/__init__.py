"""Herald's server: foundation (config, metrics, logs, tasks) <- model <- backends
<- core <- web <- process, each layer a folder (ARCHITECTURE.md)."""

__version__ = "0.1.0"
