from sparcode_cli.commands.app import main

main()
