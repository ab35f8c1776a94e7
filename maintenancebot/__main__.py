from maintenancebot.cli import main

main()
