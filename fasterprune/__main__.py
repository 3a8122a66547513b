"`python -m fasterprune` runs the demo (see `fasterprune.demo`); hand-written, not generated"
import sys
from fasterprune.demo import main

if __name__ == '__main__':
    sys.argv[0] = 'python -m fasterprune'
    main()
