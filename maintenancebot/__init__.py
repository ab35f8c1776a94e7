"""maintenancebot: declarative, safe, scheduled maintenance of Linux fleets over SSH."""

__version__ = "0.1.0"
