from batchcls.cli import main

main()
