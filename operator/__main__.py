from ifw.operator.main import main

main()
