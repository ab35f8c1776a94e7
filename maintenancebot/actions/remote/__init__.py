"""Programs sent to hosts as text (stdlib only, Python 3.6+); they never import maintenancebot."""
