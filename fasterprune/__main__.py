"`python -m fasterprune` and the `fasterprune` command run the demo (see `fasterprune.demo`); hand-written, not generated"
import sys, warnings
# fastai 2.8 compiles a few functions with `torch.jit.script` when it is imported, which recent torch deprecates with a
# FutureWarning at every start. Not the user's concern: ignored before fastai is imported, and only that warning (its
# message, category and the torch module that issues it), never one of the user's own
warnings.filterwarnings('ignore', message=r'`torch\.jit\.script` is (deprecated|not supported)', category=FutureWarning,
                        module=r'torch\.jit\._script')
from fasterprune.demo import main

if __name__ == '__main__':
    sys.argv[0] = 'python -m fasterprune'
    main()
