from spconv.benchmark.cpu import main

main()
