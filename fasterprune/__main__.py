"`python -m fasterprune` runs the demo (see `fasterprune.demo`); hand-written, not generated"
import sys, warnings
# fastai compiles a few functions with `torch.jit.script` when it is imported, which recent torch deprecates: not the user's concern
warnings.filterwarnings('ignore', message=r'`torch\.jit\.script` is deprecated', category=FutureWarning)
from fasterprune.demo import main

if __name__ == '__main__':
    sys.argv[0] = 'python -m fasterprune'
    main()
