from gpujobs.emulator.standalone import main

main()
