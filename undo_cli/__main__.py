from undo_cli.cli.app import main

main()
