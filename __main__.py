from mailmeta.cli import main

main()
