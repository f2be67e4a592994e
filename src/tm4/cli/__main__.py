from tm4.cli import main

main()
