from loramerge_cli.cli.app import main

main()
