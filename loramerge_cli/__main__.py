from loramerge_cli.cli import main

main()
