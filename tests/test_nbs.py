"Run every notebook in `nbs/` with nbdev's own test machinery: one test per notebook."
import io, signal, sys
from pathlib import Path

import pytest
from fastcore.xtras import working_directory
from nbdev.config import get_config
import nbdev.test  # not `from nbdev.test import test_nb`: pytest would collect it as a test

cfg = get_config(Path(__file__).parent)
nbs = sorted(p for p in cfg.nbs_path.glob('*.ipynb') if not p.name.startswith('_'))
if not nbs: pytest.fail(f'No notebooks found in {cfg.nbs_path}', pytrace=False)

@pytest.mark.parametrize('nb', nbs, ids=lambda p: p.name)
def test_notebook(nb, monkeypatch):
    # `test_nb` writes the failing cell's traceback to `sys.__stderr__`; capture it for the failure report
    err = io.StringIO()
    monkeypatch.setattr(sys, '__stderr__', err)
    sigint = signal.getsignal(signal.SIGINT)  # `test_nb` installs its own SIGINT handler
    skip_flags = cfg.tst_flags.split() if isinstance(cfg.tst_flags, str) else cfg.tst_flags
    try:
        with working_directory(cfg.nbs_path):
            ok,_ = nbdev.test.test_nb(nb, skip_flags=skip_flags, basepath=cfg.config_path, cell_timeout=cfg.cell_timeout or None)
    finally: signal.signal(signal.SIGINT, sigint)
    if not ok: pytest.fail(err.getvalue() or f'{nb.name} failed', pytrace=False)
