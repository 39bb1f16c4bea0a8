"""HTTP handlers: the relayed APIs (`api`) and the daemon's own endpoints (`admin`)."""
